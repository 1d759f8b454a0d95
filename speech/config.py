"""The speech package's knobs: one section of the project's settings.

``SpeechConfig`` is a ``piopiy_voice.settings.EnvSection``: every field's alias
is the variable that sets it (declared here only; ``Settings.env_names()``
includes them), read from the environment over ``.env`` by
``SpeechConfig.from_env()``; the API keys may come from ``<VARIABLE>_FILE``.
Bad values raise ``SpeechConfigError`` (a ``SpeechError`` and a
``PiopiyConfigError``) naming the variable.
"""

from __future__ import annotations

import os
import socket

from pydantic import Field, field_validator

from piopiy_voice.errors import PiopiyConfigError
from piopiy_voice.settings import EnvSection

from .errors import SpeechError

VADS = ("energy", "webrtc", "silero")
RECOGNIZERS = ("pocketsphinx", "deepgram")
SYNTHESIZERS = ("espeak", "platform", "http")
ASR_MODES = ("domain", "dictation")
_CHOICES = {"vad": VADS, "asr": RECOGNIZERS, "tts": SYNTHESIZERS, "asr_mode": ASR_MODES}


class SpeechConfigError(SpeechError, PiopiyConfigError):
    """A speech setting is wrong (the message names the variable)."""


class SpeechConfig(EnvSection):
    SECRETS = ("deepgram_api_key", "tts_api_key")
    ERROR = SpeechConfigError

    #: Voice activity detector: energy (no dependency) | webrtc | silero.
    vad: str = Field("energy", alias="PV_VAD")
    #: Recognizer of the transcriber role: pocketsphinx (local) | deepgram (service).
    asr: str = Field("pocketsphinx", alias="PV_ASR")
    #: pocketsphinx: domain (n-gram LM built from the phrase list) | dictation (shipped LM).
    asr_mode: str = Field("domain", alias="PV_ASR_MODE")
    #: File of phrases, one a line, for the domain LM ("" = the built-in list).
    asr_corpus: str = Field("", alias="PV_ASR_CORPUS")
    deepgram_url: str = Field("wss://api.deepgram.com/v1/listen", alias="PV_DEEPGRAM_URL", min_length=1)
    deepgram_api_key: str = Field("", alias="PV_DEEPGRAM_API_KEY", repr=False)
    #: "" = the service's default model.
    deepgram_model: str = Field("", alias="PV_DEEPGRAM_MODEL")
    #: Synthesizer: espeak (local) | platform (the platform speaks) | http (OpenAI-style service).
    tts: str = Field("espeak", alias="PV_TTS")
    #: http engine: base URL or the full /v1/audio/speech URL.
    tts_url: str = Field("", alias="PV_TTS_URL")
    #: espeak voice (e.g. en-us) or the http engine's voice name ("" = engine default).
    tts_voice: str = Field("", alias="PV_TTS_VOICE")
    tts_model: str = Field("tts-1", alias="PV_TTS_MODEL", min_length=1)
    tts_api_key: str = Field("", alias="PV_TTS_API_KEY", repr=False)
    #: http engine: whole-request deadline (s).
    tts_timeout_s: float = Field(10.0, alias="PV_TTS_TIMEOUT_S", ge=0.1, le=300)
    #: espeak: child processes a worker synthesises in (0 = a thread of the worker,
    #: whose GIL time then delays every call's frames; BENCHMARKS.md).
    tts_processes: int = Field(1, alias="PV_TTS_PROCESSES", ge=0, le=64)
    #: A reply's next sentence is synthesised this long before what was already
    #: sent would have played out, not as soon as the model writes it, so a
    #: barge-in leaves little synthesised for nothing (s; 0 = no pacing:
    #: every sentence at once). See ``workers.agent.voice.PlaybackPacer``.
    tts_lead_s: float = Field(1.5, alias="PV_TTS_LEAD_S", ge=0, le=60)
    #: Speech must last this long to start a turn (ms).
    turn_onset_ms: int = Field(80, alias="PV_TURN_ONSET_MS", ge=20, le=2000)
    #: Of that onset, loud unvoiced sound just before the first vowel may give
    #: this much (ms; an opening "s", "h", "f"), so such words barge in as fast
    #: as the others (``speech.turns``). At most the onset less 20 ms (one voiced
    #: frame is always needed); 0 = voiced speech only.
    turn_lead_in_ms: int = Field(60, alias="PV_TURN_LEAD_IN_MS", ge=0, le=1980)
    #: Silence this long ends a turn (ms).
    turn_hangover_ms: int = Field(400, alias="PV_TURN_HANGOVER_MS", ge=60, le=5000)
    #: Audio before the detected onset fed to the recognizer (ms).
    asr_preroll_ms: int = Field(200, alias="PV_ASR_PREROLL_MS", ge=0, le=1000)
    #: Of the silence that ends a turn, this much is fed to the recognizer before
    #: its final (ms); the rest of the hangover is never decoded. Shorter tails
    #: cost intent accuracy, the whole hangover costs CPU (``speech.transcriber``).
    asr_tail_ms: int = Field(200, alias="PV_ASR_TAIL_MS", ge=0, le=5000)
    #: pocketsphinx: its second search pass (``fwdflat``) at every end of speech:
    #: ~40% more decoder CPU and later finals, no accuracy gain measured
    #: (``speech.asr_pocketsphinx``). Off by default.
    asr_second_pass: bool = Field(False, alias="PV_ASR_SECOND_PASS")
    #: The transcriber role's lease on a call (ms).
    transcriber_lease_ms: int = Field(3000, alias="PV_TRANSCRIBER_LEASE_MS", ge=200, le=600_000)
    #: The transcriber's consumer name / lease value ("" = asr-HOSTNAME-PID; unique per replica).
    transcriber_id: str = Field("", alias="PV_TRANSCRIBER_ID")

    @field_validator("vad", "asr", "tts", "asr_mode", mode="before")
    @classmethod
    def _choice(cls, v: object, info) -> object:
        if isinstance(v, str):
            v = v.strip().lower()
            allowed = _CHOICES[info.field_name]
            if v not in allowed:
                raise ValueError(f"must be one of {', '.join(allowed)}; got {v!r}")
        return v

    @field_validator("turn_onset_ms", "turn_lead_in_ms", "turn_hangover_ms", "asr_preroll_ms",
                     "asr_tail_ms", "transcriber_lease_ms", mode="before")
    @classmethod
    def _whole_ms(cls, v: object) -> object:
        # "250.0" and 250.5 were accepted before (read as numbers, then int()).
        try:
            return int(float(v)) if isinstance(v, (str, float)) else v
        except ValueError:
            return v

    def transcriber_name(self) -> str:
        return self.transcriber_id or f"asr-{socket.gethostname()}-{os.getpid()}"

    def recognizer_opts(self) -> dict:
        """Keyword options for ``asr.make_recognizer(self.asr, **opts)``."""
        if self.asr == "deepgram":
            return {"url": self.deepgram_url, "api_key": self.deepgram_api_key,
                    "model": self.deepgram_model}
        return {"mode": self.asr_mode, "corpus": self.asr_corpus or None,
                "second_pass": self.asr_second_pass}

    def synthesizer_opts(self) -> dict:
        """Keyword options for ``tts.make_synthesizer(self.tts, **opts)``."""
        if self.tts == "http":
            return {"url": self.tts_url, "voice": self.tts_voice or "alloy", "model": self.tts_model,
                    "api_key": self.tts_api_key, "timeout_s": self.tts_timeout_s}
        if self.tts == "espeak":
            return {"voice": self.tts_voice or "en-us", "processes": self.tts_processes}
        return {}
