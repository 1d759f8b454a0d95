"""Synthesis engines: espeak through ctypes, platform, and http against a local fake."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fake_tts import FakeTts
from piopiy_voice.errors import PiopiyError
from piopiy_voice.speech.errors import SpeechError, SynthesisError
from piopiy_voice.speech.tts import make_synthesizer, to_voice_rate


@pytest.mark.parametrize("rate", [8000, 16000, 32000])
def test_espeak_speaks_at_the_call_rate(rate):
    synth = make_synthesizer("espeak")
    pcm = asyncio.run(synth.synthesize("Hello, thank you for calling.", rate))
    x = np.frombuffer(pcm, "<i2").astype(float)
    seconds = x.size / rate
    assert 1.0 < seconds < 4.0
    assert np.sqrt(np.mean(x ** 2)) > 500  # real audio, not silence
    spec = np.abs(np.fft.rfft(x))
    f = np.fft.rfftfreq(x.size, 1 / rate)
    # Speech energy sits in the voice band; nothing aliased at the top of the band.
    assert spec[(f > 100) & (f < 3000)].sum() > 20 * spec[f > 0.47 * rate].sum()


def test_espeak_is_serialised_and_runs_off_the_loop():
    synth = make_synthesizer("espeak")

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        t = asyncio.create_task(ticker())
        # Long enough that synthesis takes well over the ticker's period.
        a, b = await asyncio.gather(
            synth.synthesize("The first sentence is here. " * 6, 8000),
            synth.synthesize("The second one comes after it, and it goes on. " * 6, 8000))
        t.cancel()
        return a, b, ticks

    a, b, ticks = asyncio.run(main())
    assert a != b and len(a) > 8000 and len(b) > 8000
    assert ticks > 3  # the loop kept running while espeak worked


def test_espeak_bad_input_raises_project_errors():
    synth = make_synthesizer("espeak")
    with pytest.raises(SynthesisError, match="rate"):
        asyncio.run(synth.synthesize("hi", 11025))
    with pytest.raises(SynthesisError, match="at most"):
        asyncio.run(synth.synthesize("a" * 6000, 8000))
    with pytest.raises(SynthesisError, match="voice"):
        make_synthesizer("espeak", voice="xx-nonexistent").synthesize_sync("hi", 8000)
    assert asyncio.run(synth.synthesize("   ", 8000)) == b""
    with pytest.raises(SpeechError, match="unknown synthesizer"):
        make_synthesizer("nope")


def test_platform_engine_returns_no_audio():
    assert asyncio.run(make_synthesizer("platform").synthesize("hello", 8000)) == b""


@pytest.fixture
def fake():
    f = FakeTts()
    yield f
    f.close()


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_http_engine_speaks_openai_protocol(fake, fmt):
    synth = make_synthesizer("http", url=fake.url, voice="nova", api_key="k1", response_format=fmt)
    pcm = asyncio.run(synth.synthesize("twenty five characters...", 16000))
    # 25 chars x 40 ms of 24 kHz tone -> 1.0 s at 16 kHz
    assert abs(len(pcm) / 2 / 16000 - 1.0) < 0.01
    x = np.frombuffer(pcm, "<i2").astype(float)
    f = np.fft.rfftfreq(x.size, 1 / 16000)
    assert abs(f[np.argmax(np.abs(np.fft.rfft(x)))] - 440) < 3
    body, headers = fake.requests[0]
    assert body == {"model": "tts-1", "input": "twenty five characters...", "voice": "nova",
                    "response_format": fmt}
    assert headers["Authorization"] == "Bearer k1"


def test_http_engine_errors_are_clear(fake):
    synth = make_synthesizer("http", url=fake.url + "/v1")
    fake.mode = "error"
    with pytest.raises(SynthesisError, match="HTTP 500: model crashed"):
        asyncio.run(synth.synthesize("hello", 8000))
    fake.mode = "garbage"
    with pytest.raises(SynthesisError, match="neither WAV nor PCM"):
        asyncio.run(synth.synthesize("hello", 8000))


def test_http_engine_total_deadline_beats_a_trickling_server(fake):
    fake.mode = "trickle"
    synth = make_synthesizer("http", url=fake.url, timeout_s=0.8)
    t = time.monotonic()
    with pytest.raises(PiopiyError, match="within 0.8s"):
        asyncio.run(synth.synthesize("hello", 8000))
    assert time.monotonic() - t < 2.0


def test_http_engine_unreachable_and_bad_url():
    with pytest.raises(SynthesisError, match="unreachable"):
        asyncio.run(make_synthesizer("http", url="http://127.0.0.1:9").synthesize("hello", 8000))
    with pytest.raises(SpeechError, match="http"):
        make_synthesizer("http", url="ftp://x")


def test_any_rate_conversion_keeps_duration_and_pitch():
    t = np.arange(22050) / 22050
    pcm = (np.sin(2 * np.pi * 1000 * t) * 10000).astype("<i2").tobytes()
    out = np.frombuffer(to_voice_rate(pcm, 22050, 8000), "<i2").astype(float)
    assert out.size == 8000
    f = np.fft.rfftfreq(out.size, 1 / 8000)
    assert abs(f[np.argmax(np.abs(np.fft.rfft(out)))] - 1000) < 2


def test_espeak_renders_in_a_child_process_with_the_same_audio():
    """The coroutine renders in a spawned process (the GIL of the worker calling
    it stays free) and gives exactly what the in-process form gives."""
    import os

    from piopiy_voice.speech.tts import EspeakSynthesizer, _RenderPool

    synth = EspeakSynthesizer(processes=1)
    pcm = asyncio.run(synth.synthesize("Your order ships tomorrow.", 16000))
    here = synth.synthesize_sync("Your order ships tomorrow.", 16000)
    # espeak keeps state between utterances (which voices ran before in that
    # process), so the two renderings are the same sentence, not the same
    # samples: same length within 0.5 %, same loudness within 20 %.
    a, b = (np.frombuffer(x, "<i2").astype(float) for x in (pcm, here))
    assert len(b) > 16000 and abs(len(a) - len(b)) <= 0.005 * len(b)
    ra, rb = (float(np.sqrt(np.mean(x ** 2))) for x in (a, b))
    assert abs(ra - rb) <= 0.2 * rb
    pool = _RenderPool._pools[1]
    children = [p.pid for p in pool._processes.values()]
    assert children and os.getpid() not in children


def test_espeak_child_death_is_a_synthesis_error_then_recovers():
    import os
    import signal

    from piopiy_voice.speech.errors import SynthesisError
    from piopiy_voice.speech.tts import EspeakSynthesizer, _RenderPool

    synth = EspeakSynthesizer(processes=1)
    asyncio.run(synth.synthesize("Warm up.", 8000))
    for proc in list(_RenderPool._pools[1]._processes.values()):
        os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(SynthesisError, match="died"):
        asyncio.run(synth.synthesize("This one is lost.", 8000))
    assert len(asyncio.run(synth.synthesize("This one works again.", 8000))) > 8000
