"""``ClipAgent``: our side of ``bench/pipecat_bench.py`` (the work both systems do).

Run by the real worker (``piopiy-voice worker --agent bench.pipecat_agent:ClipAgent``
with the repo root on ``PYTHONPATH``). Per call it does exactly what the pipecat
bot of ``bench/pipecat_server.py`` does, with the worker's own parts:

- every 20 ms frame goes through the call's ``Ears`` (the VAD the worker uses
  by default, ``PV_VAD`` = ``energy``: ``speech.vad.EnergyVoicingVad``, and the
  onset/hangover detector ``speech.turns.TurnDetector`` with the
  ``PV_TURN_*`` settings), as ``ConversationAgent`` does;
- at the call's start and at every end of turn (the detector's
  ``speech_end``) it plays one fixed clip (``PlayAudio``; the gateway paces it
  out at real time in 40 ms ``streamAudio`` chunks);
- a speech onset while the clip is still playing (by the agent's own
  send-time estimate, as ``ConversationAgent`` keeps it) is a barge-in:
  ``Interrupt``, which the gateway turns into ``{"action":"break"}``.

No transcripts, DTMF, replies work or timers: the pipecat side has none of them
either. The clip is raw 16-bit PCM at the call's rate, read once per process
from the file named by ``BENCH_CLIP_FILE`` (the bench writes it).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from piopiy_voice import contracts as c
from piopiy_voice.workers.agent.base import Agent
from piopiy_voice.workers.agent.config import env_config
from piopiy_voice.workers.agent.ears import Ears

#: Not a ``PV_`` name: the settings loader warns about ``PV_`` variables it does not know.
CLIP_ENV = "BENCH_CLIP_FILE"


@lru_cache(maxsize=None)
def clip_pcm(path: str) -> bytes:
    with open(path, "rb") as fh:
        pcm = fh.read()
    if not pcm or len(pcm) % 2:
        raise ValueError(f"{path}: not 16-bit PCM ({len(pcm)} bytes)")
    return pcm


class ClipAgent(Agent):
    """VAD + turn detector per frame; a fixed clip per turn; barge-in cuts it."""

    _FIELDS = ("playing_until", "clips", "barge_ins")

    def __init__(self, call: c.CallStarted, settings: Any) -> None:
        super().__init__(call, settings)
        sp = env_config().speech
        self.ears = Ears(sp.vad, call.rate, sp.turn_onset_ms, sp.turn_hangover_ms, sp.turn_lead_in_ms)
        self.clip = clip_pcm(os.environ[CLIP_ENV])
        self.clip_s = len(self.clip) / (2 * call.rate)
        self.playing_until = 0.0
        self.clips = 0
        self.barge_ins = 0

    def on_event(self, event: Any, now: float) -> list[Any]:
        if isinstance(event, c.AudioFrame):
            ev = self.ears.process(event.pcm)
            if ev == "speech_start" and now < self.playing_until:
                self.playing_until = 0.0
                self.barge_ins += 1
                return [self.command(c.Interrupt)]
            if ev == "speech_end":
                return self._play(now)
            return []
        if isinstance(event, c.CallStarted):
            return self._play(now)
        return []

    def _play(self, now: float) -> list[Any]:
        self.clips += 1
        self.playing_until = max(now, self.playing_until) + self.clip_s
        return [self.command(c.PlayAudio, utterance_id=f"{self.call.call_id}:clip:{self.clips}",
                             pcm=self.clip, rate=self.call.rate)]

    def to_state(self) -> dict[str, Any]:
        state = super().to_state()
        state["ears"] = self.ears.to_state()
        return state

    @classmethod
    def from_state(cls, call: c.CallStarted, settings: Any, data: dict[str, Any]) -> "ClipAgent":
        agent = super().from_state(call, settings, data)
        agent.ears.restore(data.get("ears") or {})
        return agent
