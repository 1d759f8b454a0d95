"""What the talking agents say with: shipped prompts and synthesizers.

- ``prompt(name, rate)``: a shipped prompt (``workers/media/<name>.wav``,
  texts in ``workers.media.make_prompts.PROMPTS``) as PCM at the call's rate,
  cached per rate: greetings and apologies need no synthesis, so they go out
  at once.
- ``get_synthesizer(name, speech)``: one synthesizer per engine per process
  (engines hold libraries and HTTP pools).
- ``say_sentences``: the work that synthesizes a reply sentence by sentence,
  yielding ``({"say": text}, pcm)`` as each is ready (first audio before the
  reply is complete), or ``{"failed": "tts", ...}`` and stop.
- ``PlaybackPacer`` / ``speak_paced``: synthesis paced to playback. A reply's
  first sentence is synthesized at once; each next one only when the audio
  already sent is ``lead_s`` (``PV_TTS_LEAD_S``, 1.5 s) from having played
  out, not as soon as the model has written it. Why: callers barge in, and
  everything not yet heard is then thrown away; synthesizing it cost the
  worker's box CPU (espeak) or money (a network engine), and its audio went
  through Redis and the gateway for nothing. Measured in BENCHMARKS.md
  ("Synthesis paced to playback").

  The pacer never sees the platform: it adds up the length of the audio it
  has handed on, as if each part started playing the moment it was handed
  on. Real playout starts later than that (Redis, the gateway, any prompt
  queued before it), so the estimate runs early and the real lead is never
  shorter than ``lead_s``: pacing cannot open a gap in the reply. The lead
  has to cover one sentence's synthesis plus the trip to the platform: 1.5 s
  covers espeak (tens of ms a sentence) many times over; an engine that can
  take longer for a sentence (a network one under load) needs more.
  Pacing stops at ``pace_until`` (the model's own deadline), so a long reply
  still ends within the work's total deadline; a barge-in cancels the work,
  and with it the wait. The price: when a worker dies mid-reply, the
  sentences not yet synthesised die with it (a work's text is not
  checkpointed), so the reply ends with the last sentence sent
  (``replies``: a lost work that had spoken is not asked again).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from pathlib import Path
from typing import Any

from piopiy_voice.audio import read_wav, resample
from piopiy_voice.speech.config import SpeechConfig
from piopiy_voice.speech.tts import make_synthesizer
from piopiy_voice.workers.media.make_prompts import PROMPTS as PROMPT_TEXTS

from .history import SPEAK_S_PER_CHAR

MEDIA = Path(__file__).resolve().parent.parent / "media"
PROMPTS = tuple(PROMPT_TEXTS)


@lru_cache(maxsize=None)
def prompt(name: str, rate: int) -> bytes:
    """A shipped prompt as PCM at ``rate`` (cached per rate)."""
    if name not in PROMPTS:
        raise ValueError(f"unknown prompt {name!r}; expected one of {PROMPTS}")
    pcm, src = read_wav(MEDIA / f"{name}.wav")
    return resample(pcm, src, rate) if src != rate else pcm


_synths: dict[tuple, Any] = {}


def get_synthesizer(name: str, speech: SpeechConfig) -> Any:
    """One synthesizer per engine per process (they hold libraries and HTTP pools)."""
    opts = speech.synthesizer_opts() if name == speech.tts else {}
    key = (name, tuple(sorted(opts.items())))
    if key not in _synths:
        _synths[key] = make_synthesizer(name, **opts)
    return _synths[key]


class PlaybackPacer:
    """When to synthesize a reply's next sentence (module docstring).

    Pure: every method takes ``now`` (any monotonic clock, seconds); the
    works use their event loop's clock."""

    def __init__(self, lead_s: float, pace_until: float) -> None:
        self.lead_s = lead_s
        self.pace_until = pace_until
        #: When the audio handed on so far would have played out (the estimate).
        self.plays_until = float("-inf")

    def wait_s(self, now: float) -> float:
        """How long to wait before synthesizing the next sentence (0: now)."""
        if self.lead_s <= 0:
            return 0.0
        return max(0.0, min(self.plays_until - self.lead_s, self.pace_until) - now)

    def handed_on(self, seconds: float, now: float) -> None:
        """``seconds`` of speech were handed on at ``now``."""
        self.plays_until = max(self.plays_until, now) + seconds


def speech_s(text: str, pcm: bytes, rate: int) -> float:
    """How long a synthesized sentence plays: its PCM, or for the platform's
    own ``speak`` (no PCM here) the same estimate the history uses."""
    return len(pcm) / (2 * rate) if pcm else SPEAK_S_PER_CHAR * len(text)


async def speak_paced(synth: Any, text: str, rate: int, pacer: PlaybackPacer) -> Any:
    """One sentence, when the pacer says: ``({"say": text}, pcm)``, or
    ``{"failed": "tts", ...}`` if the engine failed (the reply's failure,
    not the call's)."""
    loop = asyncio.get_running_loop()
    wait = pacer.wait_s(loop.time())
    if wait > 0:
        await asyncio.sleep(wait)
    try:
        pcm = await synth.synthesize(text, rate)
    except Exception as exc:  # noqa: BLE001 (any engine failure, reported as such)
        return {"failed": "tts", "error": f"{type(exc).__name__}: {exc}"}
    pacer.handed_on(speech_s(text, pcm, rate), loop.time())
    return ({"say": text}, pcm)


async def say_sentences(synth: Any, sentences: list[str], rate: int, lead_s: float = 0.0,
                        pace_for_s: float = 0.0):
    """Work: synthesize sentences one by one, paced to playback by ``lead_s``
    for at most ``pace_for_s`` (module docstring); each ``({"say": text},
    pcm)`` as it is ready, or ``{"failed": "tts", ...}`` and stop."""
    pacer = PlaybackPacer(lead_s, asyncio.get_running_loop().time() + pace_for_s)
    for text in sentences:
        item = await speak_paced(synth, text, rate, pacer)
        yield item
        if isinstance(item, dict):
            return
