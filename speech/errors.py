"""Errors of the speech engines, under the project root ``PiopiyError``.

A caller (the agent runtime, the transcriber role) treats them alike: the
engine failed for this utterance, the call goes on with a fallback. The
subclass says which side failed; the message says why.
"""

from __future__ import annotations

from piopiy_voice.errors import PiopiyError


class SpeechError(PiopiyError):
    """Base of every speech engine error (bad engine name, missing extra...)."""


class EngineUnavailable(SpeechError):
    """The engine's optional package or model is not installed."""


class SynthesisError(SpeechError):
    """A synthesizer failed, timed out or returned something that is not audio."""


class RecognitionError(SpeechError):
    """A recognizer failed, timed out or its service broke the protocol."""
