"""Real speech for the sandbox: scripted sentences and the platform's ``speak``.

Both are rendered by espeak-ng (``piopiy_voice.speech.tts.EspeakSynthesizer``)
at the call's rate. Rendering a sentence costs tens of milliseconds of CPU, far
more than a 20 ms tick, so it never happens on a call's clock:

* a scenario's ``say`` texts are rendered when the call is created, in a
  thread (``prerender``), while the phone rings; the script player then finds
  them in the cache (``render`` of a cached sentence is a dict lookup);
* the platform's ``speak`` action renders in a thread (``asyncio.to_thread``)
  before its audio is queued.

The cache is keyed by (text, voice, rate) and bounded (least recently used
out): a load run of many calls with one script renders each sentence once per
rate. A failure (an unknown voice, no espeak library) is cached too, so a bad
step fails fast every time and the error says what went wrong.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable

from .scenario import DEFAULT_VOICE

CACHE_MAX = 512

_lock = threading.Lock()
_cache: "OrderedDict[tuple[str, str, int], bytes | Exception]" = OrderedDict()
_synths: dict[str, object] = {}
#: Sentences actually synthesized (not served from the cache): tests count them.
renders = 0


class SayRenderError(RuntimeError):
    """A ``say`` text or ``speak`` could not be synthesized."""


def _synth(voice: str):
    from piopiy_voice.speech.tts import EspeakSynthesizer  # noqa: PLC0415 (loads a C library)

    synth = _synths.get(voice)
    if synth is None:
        synth = _synths[voice] = EspeakSynthesizer(voice=voice)
    return synth


def cached(text: str, voice: str, rate: int) -> bool:
    with _lock:
        return (text, voice, rate) in _cache


def render(text: str, voice: str = DEFAULT_VOICE, rate: int = 8000) -> bytes:
    """16-bit mono PCM of ``text`` spoken by espeak ``voice`` at ``rate`` (cached)."""
    global renders
    key = (text, voice, int(rate))
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
    if hit is None:
        try:
            hit = _synth(voice).synthesize_sync(text, int(rate))
            if not hit:
                raise SayRenderError(f"espeak rendered nothing for {text[:60]!r}")
        except Exception as exc:  # noqa: BLE001 - remembered and re-raised below
            hit = exc if isinstance(exc, SayRenderError) else SayRenderError(
                f"cannot synthesize {text[:60]!r} with voice {voice!r}: {exc}")
        with _lock:
            renders += 1
            _cache[key] = hit
            while len(_cache) > CACHE_MAX:
                _cache.popitem(last=False)
    if isinstance(hit, Exception):
        raise hit
    return hit


def prerender(texts: Iterable[tuple[str, str]], rate: int) -> list[str]:
    """Render every (text, voice) at ``rate`` into the cache; the errors, as text."""
    errors = []
    for text, voice in texts:
        try:
            render(text, voice, rate)
        except SayRenderError as exc:
            errors.append(str(exc))
    return errors
