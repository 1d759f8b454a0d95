"""DefaultAgent: the built-in, offline conversational agent (rules, no model).

The call machinery (turn-taking, barge-in, DTMF, pause, reprompts, goodbye,
hand-off, history, fallbacks) is ``ConversationAgent``'s; this brain answers a
caller's turn from ``intents.classify`` of the final transcript:

- greets with the shipped ``greeting`` prompt (fast first audio);
- answers a greeting and a few questions (opening hours, what can you do,
  order status...) with text synthesized by the configured synthesizer
  (``PV_TTS``, default espeak) as a work, sentence by sentence;
- hands off when the caller asks for a person in words ("a human", "an
  agent", "a real person", "operator", "representative") exactly as on the
  DTMF hand-off key (``Settings.handoff_key``): hold notice, music on hold
  (``PlayMusic(Settings.hold_music)``), ``Transfer`` to
  ``Settings.human_agent_number`` (caller id: call param ``caller_id``, else
  ``Settings.piopiy_caller_id``), then monitoring (it listens, never speaks);
- says goodbye and hangs up on "bye" / "that's all";
- "sorry, I didn't catch that" (shipped) on an empty or missing final;
- ``Settings.pause_key``: ``Pause`` so card digits never reach us, ``Resume``
  after ``Settings.pause_resume_after_s`` or when someone else resumes;
- silence for ``Settings.silence_timeout_s`` -> reprompt, again -> goodbye +
  hangup; ``Settings.max_call_s`` -> goodbye + hangup.
"""

from __future__ import annotations

import re
from typing import Any

from .conversation import PROMPTS, ConversationAgent, prompt, say_sentences
from .intents import classify

__all__ = ["DefaultAgent", "PROMPTS", "prompt"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SAY_TIMEOUT_S = 10.0
#: Of that deadline, the part after which sentences are no longer paced to
#: playback (``voice.PlaybackPacer``): what is left is for their synthesis.
SAY_PACED_S = 6.0


class DefaultAgent(ConversationAgent):
    def start_reply(self, now: float) -> list[Any]:
        intent = classify(self.history[-1]["content"])
        if intent.action == "handoff":
            return self.handoff(now, cut=True)
        if intent.action == "goodbye":
            return self._stop_speaking(now) + self._say_goodbye(now)
        sentences = [s for s in _SENTENCE_END.split(intent.reply) if s]
        synth = self.synthesizer()
        work = self.work("say", say_sentences, synth, sentences, self.call.rate,
                         lead_s=self.config.speech.tts_lead_s, pace_for_s=SAY_PACED_S,
                         timeout_s=SAY_TIMEOUT_S)
        return self.begin_reply(work, now)
