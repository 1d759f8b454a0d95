"""Speech synthesis: text in, 16-bit mono PCM at the call's rate out.

Theory of operation
-------------------
A ``Synthesizer`` has one coroutine, ``synthesize(text, rate)``. Agents call it
from the worker's agent runtime (an asyncio loop on a background thread), one
sentence at a time (see ``speech.text``), so the first sentence plays while the
model is still writing the next.

Engines (``make_synthesizer(name, **opts)``):

- ``espeak`` (default, offline): libespeak-ng from the ``espeakng-loader``
  wheel, driven with ctypes in synchronous mode (``espeak_Synth`` returns when
  the whole text is rendered; a callback collects the samples). The library
  keeps global state and is not thread-safe: every use holds one process-wide
  lock. espeak renders at 22050 Hz; ``piopiy_voice.audio.resample`` (soxr)
  converts that to the call rate. The coroutine renders in a small pool of
  child processes (``processes``, PV_TTS_PROCESSES, default 1), not in a thread
  of the caller: espeak's sample callbacks and the resampling hold the GIL, and
  in a worker that GIL time is every other call's frames (measured: stream lag
  p99 242 ms at 100 calls with espeak on a thread of the worker, 43-53 ms with
  no synthesis there; BENCHMARKS.md). ``processes=0`` renders on a thread.
  ``synthesize_sync`` (benches, the sandbox, prompt building) renders in the
  calling process. Not bit-for-bit repeatable: the library carries state from
  one utterance to the next (its pitch flutter), so the same text renders a
  little differently depending on what that process rendered before (a test
  that times pauses against the audio renders it in a fresh process:
  ``tests/test_transcriber_hangover.py``).
- ``platform``: returns ``b""``: the agent sends a ``Speak`` command instead and
  the platform's own ``speak`` PCMO action talks.
- ``http``: an OpenAI-compatible ``POST /v1/audio/speech`` (JSON ``model``,
  ``input``, ``voice``, ``response_format``), answering WAV (any rate, 16-bit
  mono or stereo) or raw PCM (``pcm``: 24 kHz 16-bit mono, OpenAI's format).
  The whole request, headers and body included, has one total deadline
  (``timeout_s``): a server that trickles its answer cannot hold a call.

Every failure raises ``SynthesisError`` (a ``PiopiyError``) with a clear message.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import struct
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from piopiy_voice.audio import resample
from piopiy_voice.audio.pcm import check_rate
from piopiy_voice.audio.wav import read_wav

from .errors import EngineUnavailable, SpeechError, SynthesisError

ESPEAK_RATE = 22050
#: OpenAI's ``pcm`` response format.
OPENAI_PCM_RATE = 24000
MAX_TEXT_CHARS = 5000


class Synthesizer(Protocol):
    name: str

    async def synthesize(self, text: str, rate: int) -> bytes:
        """16-bit little-endian mono PCM of ``text`` at ``rate`` (8000/16000/32000)."""
        ...


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise SynthesisError(f"text must be a str, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise SynthesisError(f"text is {len(text)} characters; synthesize at most {MAX_TEXT_CHARS} "
                             "at a time (split with speech.text)")
    return text.strip()


def _check_rate(rate: Any) -> int:
    try:
        return check_rate(rate)
    except ValueError as exc:
        raise SynthesisError(str(exc)) from None


# --------------------------------------------------------------------------
# Any rate -> a voice rate
# --------------------------------------------------------------------------

def to_voice_rate(pcm: bytes, src: int, rate: int) -> bytes:
    """16-bit mono PCM at any ``src`` rate (espeak: 22050) -> ``rate`` (8000/16000/32000)."""
    return resample(pcm, src, _check_rate(rate))


# --------------------------------------------------------------------------
# espeak-ng through ctypes
# --------------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Espeak:
    """The process's one libespeak-ng; every use holds ``lock``."""

    lock = threading.Lock()
    _instance: "_Espeak | None" = None

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise EngineUnavailable("the espeak synthesizer needs the espeakng-loader package") from None
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                     espeakng_loader.get_data_path().encode(), _INIT_DONT_EXIT)
        if rate <= 0:
            raise EngineUnavailable(f"espeak-ng failed to initialise (code {rate})")
        self.rate = rate
        self.lib = lib
        self._chunks: list[bytes] = []
        self._cb = _CALLBACK(self._collect)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, n, _events) -> int:
        if n > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, n * 2))
        return 0

    @classmethod
    def get(cls) -> "_Espeak":
        with cls.lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def render(self, text: str, voice: str, wpm: int, pitch: int) -> tuple[bytes, int]:
        data = text.encode("utf-8")
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SynthesisError(f"espeak has no voice {voice!r} (try en-us, en, en-gb-scotland, en-us+f3)")
            self.lib.espeak_SetParameter(_PARAM_RATE, int(wpm), 0)
            self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            self._chunks = []
            rc = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            pcm, self._chunks = b"".join(self._chunks), []
        if rc != 0:
            raise SynthesisError(f"espeak_Synth failed with code {rc}")
        return pcm, self.rate


def _render_in_child(text: str, voice: str, wpm: int, pitch: int, rate: int) -> tuple[bytes, str]:
    """Runs in a synthesis process: (pcm, "") or (b"", the error message), so no
    exception class has to survive pickling."""
    try:
        return EspeakSynthesizer(voice, wpm, pitch, processes=0).synthesize_sync(text, rate), ""
    except Exception as exc:  # noqa: BLE001 - reported to the caller as SynthesisError
        return b"", str(exc) or type(exc).__name__


class _RenderPool:
    """The process's espeak child processes, started once on first use.

    "spawn", not fork: the worker forks from a process with threads (the agent
    runtime, redis), and a forked child could inherit a lock held mid-call."""

    _lock = threading.Lock()
    _pools: dict[int, ProcessPoolExecutor] = {}

    @classmethod
    def get(cls, n: int) -> ProcessPoolExecutor:
        with cls._lock:
            pool = cls._pools.get(n)
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_Espeak.get)
                cls._pools[n] = pool
            return pool

    @classmethod
    def discard(cls, n: int, pool: ProcessPoolExecutor) -> None:
        """A child died (killed, out of memory): the next call starts a new pool."""
        with cls._lock:
            if cls._pools.get(n) is pool:
                del cls._pools[n]
        pool.shutdown(wait=False, cancel_futures=True)


class EspeakSynthesizer:
    """Offline synthesis with libespeak-ng (see the module docstring)."""

    name = "espeak"

    def __init__(self, voice: str = "en-us", wpm: int = 165, pitch: int = 50, processes: int = 1) -> None:
        if not 80 <= int(wpm) <= 450:
            raise SpeechError(f"wpm must be in [80, 450], got {wpm}")
        if not 0 <= int(pitch) <= 100:
            raise SpeechError(f"pitch must be in [0, 100], got {pitch}")
        if not 0 <= int(processes) <= 64:
            raise SpeechError(f"processes must be in [0, 64], got {processes}")
        self.voice = voice or "en-us"
        self.wpm = int(wpm)
        self.pitch = int(pitch)
        self.processes = int(processes)
        self._lib = _Espeak.get()  # fails here, clearly, when espeak is missing

    def synthesize_sync(self, text: str, rate: int) -> bytes:
        """Blocking form, in this process (benches, the sandbox, prompt building)."""
        text = _check_text(text)
        rate = _check_rate(rate)
        if not text:
            return b""
        pcm, src = self._lib.render(text, self.voice, self.wpm, self.pitch)
        return to_voice_rate(pcm, src, rate)

    async def synthesize(self, text: str, rate: int) -> bytes:
        if not self.processes:
            return await asyncio.to_thread(self.synthesize_sync, text, rate)
        text = _check_text(text)
        rate = _check_rate(rate)
        if not text:
            return b""
        pool = _RenderPool.get(self.processes)
        try:
            pcm, error = await asyncio.get_running_loop().run_in_executor(
                pool, _render_in_child, text, self.voice, self.wpm, self.pitch, rate)
        except BrokenProcessPool:
            _RenderPool.discard(self.processes, pool)
            raise SynthesisError("an espeak synthesis process died; the next sentence starts a new one") from None
        if error:
            raise SynthesisError(error)
        return pcm


class PlatformSynthesizer:
    """No local audio: the agent sends ``Speak(text)`` and the platform talks."""

    name = "platform"

    async def synthesize(self, text: str, rate: int) -> bytes:
        _check_text(text)
        _check_rate(rate)
        return b""


# --------------------------------------------------------------------------
# A network engine: OpenAI-compatible /v1/audio/speech
# --------------------------------------------------------------------------


def decode_wav(body: bytes) -> tuple[bytes, int]:
    """16-bit PCM WAV -> (mono PCM, rate); ``SynthesisError`` for anything else."""
    try:
        pcm, rate = read_wav(body)
    except (ValueError, struct.error) as exc:
        raise SynthesisError(f"WAV reply: {exc}") from None
    if not 4000 <= rate <= 96000:
        raise SynthesisError(f"WAV reply has an implausible sample rate {rate}")
    return pcm, rate


class HttpSynthesizer:
    """OpenAI-compatible speech endpoint, one POST per sentence (see the module docstring)."""

    name = "http"

    def __init__(self, url: str, voice: str = "alloy", model: str = "tts-1", api_key: str = "",
                 timeout_s: float = 10.0, response_format: str = "wav",
                 max_bytes: int = 20_000_000) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise SpeechError(f"the http synthesizer needs an http(s):// url (PV_TTS_URL), got {url!r}")
        if response_format not in ("wav", "pcm"):
            raise SpeechError(f"response_format must be 'wav' or 'pcm', got {response_format!r}")
        if not 0 < timeout_s <= 300:
            raise SpeechError(f"timeout_s must be in (0, 300], got {timeout_s}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/audio/speech") else (
            url + ("/audio/speech" if url.endswith("/v1") else "/v1/audio/speech"))
        self.voice, self.model, self.api_key = voice, model, api_key
        self.timeout_s = float(timeout_s)
        self.response_format = response_format
        self.max_bytes = int(max_bytes)

    async def synthesize(self, text: str, rate: int) -> bytes:
        text = _check_text(text)
        rate = _check_rate(rate)
        if not text:
            return b""
        try:
            async with asyncio.timeout(self.timeout_s):
                status, ctype, body = await self._post(text)
        except TimeoutError:
            raise SynthesisError(f"speech server {self.url} gave no complete answer within "
                                 f"{self.timeout_s:g}s") from None
        if status != 200:
            snippet = body[:200].decode("utf-8", "replace")
            raise SynthesisError(f"speech server {self.url} answered HTTP {status}: {snippet}")
        if body[:4] == b"RIFF":
            pcm, src = decode_wav(body)
        elif self.response_format == "pcm" or "audio/pcm" in ctype or "audio/l16" in ctype:
            if len(body) % 2:
                raise SynthesisError("raw PCM reply has an odd number of bytes")
            src = OPENAI_PCM_RATE
            if "rate=" in ctype:
                try:
                    src = int(ctype.split("rate=")[1].split(";")[0])
                except ValueError:
                    raise SynthesisError(f"bad rate in content-type {ctype!r}") from None
            pcm = body
        else:
            raise SynthesisError(f"speech server {self.url} answered {ctype or 'no content-type'} "
                                 f"({len(body)} bytes) that is neither WAV nor PCM")
        return await asyncio.to_thread(to_voice_rate, pcm, src, rate)

    async def _post(self, text: str) -> tuple[int, str, bytes]:
        import httpx

        headers = {"Accept": "audio/wav" if self.response_format == "wav" else "audio/pcm"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        payload = {"model": self.model, "input": text, "voice": self.voice,
                   "response_format": self.response_format}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client:
                async with client.stream("POST", self.url, json=payload, headers=headers) as resp:
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_bytes:
                            raise SynthesisError(f"speech reply exceeds {self.max_bytes} bytes")
                    return resp.status_code, resp.headers.get("content-type", "").lower(), bytes(body)
        except httpx.HTTPError as exc:
            raise SynthesisError(f"speech server {self.url} unreachable or broke the "
                                 f"connection: {exc!r}") from None


def make_synthesizer(name: str = "espeak", **opts: Any) -> Synthesizer:
    """``espeak`` (default) | ``platform`` | ``http`` (see the module docstring)."""
    name = (name or "espeak").lower()
    if name == "espeak":
        return EspeakSynthesizer(**opts)
    if name == "platform":
        return PlatformSynthesizer()
    if name == "http":
        return HttpSynthesizer(**opts)
    raise SpeechError(f"unknown synthesizer {name!r}; choose espeak, platform or http")
