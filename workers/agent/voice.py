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
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from piopiy_voice.audio import read_wav, resample
from piopiy_voice.speech.config import SpeechConfig
from piopiy_voice.speech.tts import make_synthesizer
from piopiy_voice.workers.media.make_prompts import PROMPTS as PROMPT_TEXTS

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


async def say_sentences(synth: Any, sentences: list[str], rate: int):
    """Work: synthesize sentences one by one; each ({"say": text}, pcm) as it is ready."""
    for text in sentences:
        try:
            pcm = await synth.synthesize(text, rate)
        except Exception as exc:  # any engine failure is this reply's failure, not the call's
            yield {"failed": "tts", "error": f"{type(exc).__name__}: {exc}"}
            return
        yield ({"say": text}, pcm)
