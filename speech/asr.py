"""Speech recognition interface: streams of PCM in, hypotheses out.

Theory of operation
-------------------
A ``Recognizer`` is made once per process (``make_recognizer(name, **opts)``:
it loads models, or holds a service's address and key). ``open(rate)`` starts
one *segment stream*: the audio of one utterance, as cut by voice activity
(``speech.turns``) plus a short pre-roll. ``feed(pcm)`` takes any whole number
of 16-bit samples at ``rate`` and returns partial hypotheses when the text
changed (engines rate-limit them); ``finish()`` returns the final hypothesis
and releases the stream. ``close()`` abandons a stream without a result (call
ended, lease lost).

Engines:

- ``pocketsphinx`` (default, offline; ``speech.asr_pocketsphinx``): CMU
  PocketSphinx with the en-us acoustic model shipped in its wheel, and by
  default a small domain language model built at start from a phrase list.
- ``deepgram`` (network; ``speech.asr_deepgram``): Deepgram's live streaming
  WebSocket API.

Failures raise ``RecognitionError`` (a ``PiopiyError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .errors import SpeechError


@dataclass(frozen=True)
class Hyp:
    text: str
    final: bool
    confidence: float | None = None


class RecognizerStream(Protocol):
    def feed(self, pcm: bytes) -> list[Hyp]: ...

    def finish(self) -> Hyp: ...

    def close(self) -> None: ...


class Recognizer(Protocol):
    name: str

    def open(self, rate: int) -> RecognizerStream: ...


def make_recognizer(name: str = "pocketsphinx", **opts: Any) -> Recognizer:
    """``pocketsphinx`` (default) | ``deepgram``; options as the engine's class takes them."""
    name = (name or "pocketsphinx").lower()
    if name == "pocketsphinx":
        from .asr_pocketsphinx import PocketsphinxRecognizer
        return PocketsphinxRecognizer(**opts)
    if name == "deepgram":
        from .asr_deepgram import DeepgramRecognizer
        return DeepgramRecognizer(**opts)
    raise SpeechError(f"unknown recognizer {name!r}; choose pocketsphinx or deepgram")
