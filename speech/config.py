"""The speech package's knobs, read from ``PV_*`` environment variables.

One frozen dataclass, built by ``SpeechConfig.from_env()``; bad values raise
``SpeechError`` naming the variable. (To be folded into ``piopiy_voice.settings``
by its owner; until then this is the single place these names are read.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from .errors import SpeechError

VADS = ("energy", "webrtc", "silero")
RECOGNIZERS = ("pocketsphinx", "deepgram")
SYNTHESIZERS = ("espeak", "platform", "http")


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    v = env.get(name, "").strip().lower() or default
    if v not in allowed:
        raise SpeechError(f"{name} must be one of {', '.join(allowed)}; got {v!r}")
    return v


def _number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise SpeechError(f"{name} must be a number, got {raw!r}") from None
    if not lo <= v <= hi:
        raise SpeechError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


@dataclass(frozen=True)
class SpeechConfig:
    vad: str = "energy"                 # PV_VAD
    asr: str = "pocketsphinx"           # PV_ASR
    asr_mode: str = "domain"            # PV_ASR_MODE: domain (our n-gram LM) | dictation (shipped LM)
    asr_corpus: str = ""                # PV_ASR_CORPUS: file of phrases, one a line ("" = built-in)
    deepgram_url: str = "wss://api.deepgram.com/v1/listen"   # PV_DEEPGRAM_URL
    deepgram_api_key: str = ""          # PV_DEEPGRAM_API_KEY
    deepgram_model: str = ""            # PV_DEEPGRAM_MODEL ("" = service default)
    tts: str = "espeak"                 # PV_TTS
    tts_url: str = ""                   # PV_TTS_URL (http engine: base URL or full /v1/audio/speech URL)
    tts_voice: str = ""                 # PV_TTS_VOICE (espeak voice, e.g. en-us; http: the voice name)
    tts_model: str = "tts-1"            # PV_TTS_MODEL (http engine)
    tts_api_key: str = ""               # PV_TTS_API_KEY (http engine, Bearer)
    tts_timeout_s: float = 10.0         # PV_TTS_TIMEOUT_S (http engine total deadline)
    turn_onset_ms: int = 80             # PV_TURN_ONSET_MS
    turn_hangover_ms: int = 400         # PV_TURN_HANGOVER_MS
    asr_preroll_ms: int = 200           # PV_ASR_PREROLL_MS
    transcriber_lease_ms: int = 3000    # PV_TRANSCRIBER_LEASE_MS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "SpeechConfig":
        e = os.environ if env is None else env
        mode = _choice(e, "PV_ASR_MODE", ("domain", "dictation"), "domain")
        return cls(
            vad=_choice(e, "PV_VAD", VADS, "energy"),
            asr=_choice(e, "PV_ASR", RECOGNIZERS, "pocketsphinx"),
            asr_mode=mode,
            asr_corpus=e.get("PV_ASR_CORPUS", "").strip(),
            deepgram_url=e.get("PV_DEEPGRAM_URL", "").strip() or cls.deepgram_url,
            deepgram_api_key=e.get("PV_DEEPGRAM_API_KEY", ""),
            deepgram_model=e.get("PV_DEEPGRAM_MODEL", "").strip(),
            tts=_choice(e, "PV_TTS", SYNTHESIZERS, "espeak"),
            tts_url=e.get("PV_TTS_URL", "").strip(),
            tts_voice=e.get("PV_TTS_VOICE", "").strip(),
            tts_model=e.get("PV_TTS_MODEL", "").strip() or cls.tts_model,
            tts_api_key=e.get("PV_TTS_API_KEY", ""),
            tts_timeout_s=_number(e, "PV_TTS_TIMEOUT_S", cls.tts_timeout_s, 0.1, 300),
            turn_onset_ms=int(_number(e, "PV_TURN_ONSET_MS", cls.turn_onset_ms, 20, 2000)),
            turn_hangover_ms=int(_number(e, "PV_TURN_HANGOVER_MS", cls.turn_hangover_ms, 60, 5000)),
            asr_preroll_ms=int(_number(e, "PV_ASR_PREROLL_MS", cls.asr_preroll_ms, 0, 1000)),
            transcriber_lease_ms=int(_number(e, "PV_TRANSCRIBER_LEASE_MS", cls.transcriber_lease_ms,
                                             200, 600_000)),
        )

    def recognizer_opts(self) -> dict:
        """Keyword options for ``asr.make_recognizer(self.asr, **opts)``."""
        if self.asr == "deepgram":
            return {"url": self.deepgram_url, "api_key": self.deepgram_api_key,
                    "model": self.deepgram_model}
        return {"mode": self.asr_mode, "corpus": self.asr_corpus or None}

    def synthesizer_opts(self) -> dict:
        """Keyword options for ``tts.make_synthesizer(self.tts, **opts)``."""
        if self.tts == "http":
            return {"url": self.tts_url, "voice": self.tts_voice or "alloy", "model": self.tts_model,
                    "api_key": self.tts_api_key, "timeout_s": self.tts_timeout_s}
        if self.tts == "espeak":
            return {"voice": self.tts_voice or "en-us"}
        return {}
