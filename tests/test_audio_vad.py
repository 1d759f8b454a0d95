"""Energy VAD on generated speech, silence and noise."""

import json

import numpy as np
import pytest

from piopiy_voice.audio import EnergyVad, array_to_pcm, frame_bytes, mix, silence, speech_like, tone


def frames(pcm: bytes, rate: int) -> list[bytes]:
    fb = frame_bytes(rate)
    return [pcm[i:i + fb] for i in range(0, len(pcm) - fb + 1, fb)]


def events(vad: EnergyVad, pcm: bytes) -> list[tuple[int, str]]:
    out = []
    for i, f in enumerate(frames(pcm, vad.rate)):
        e = vad.process(f)
        if e:
            out.append(((i + 1) * 20, e))  # time at the end of the frame that caused it
    return out


def noise(ms: int, rate: int, level_db: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return array_to_pcm(rng.standard_normal(rate * ms // 1000) * 10 ** (level_db / 20))


@pytest.mark.parametrize("rate", [8000, 16000, 32000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speech_between_silences_gives_one_start_and_one_end(rate, seed):
    pcm = silence(600, rate) + speech_like(2500, rate, seed=seed) + silence(1000, rate)
    ev = events(EnergyVad(rate), pcm)
    assert [e for _, e in ev] == ["speech_start", "speech_end"]
    start, end = ev[0][0], ev[1][0]
    assert 600 + 60 <= start <= 600 + 160  # needs start_ms of speech, syllables ramp up
    assert 3100 + 300 - 250 <= end <= 3100 + 300 + 20  # hangover after the last syllable


def test_start_ms_and_hangover_ms_hysteresis_exact():
    rate = 8000
    loud = tone(300, 20, rate, 0.3)
    vad = EnergyVad(rate, start_ms=60, hangover_ms=100)
    seq = [silence(20, rate)] * 5 + [loud] * 2 + [silence(20, rate)] + [loud] * 3
    got = [vad.process(f) for f in seq]
    # Two loud frames then a gap: not enough. Three in a row: start on the third.
    assert got == [None] * 10 + ["speech_start"]
    got = [vad.process(silence(20, rate)) for _ in range(4)] + [vad.process(loud)]
    assert got == [None] * 5 and vad.speaking  # 80 ms quiet < hangover, speech resumes
    got = [vad.process(silence(20, rate)) for _ in range(5)]
    assert got == [None] * 4 + ["speech_end"] and not vad.speaking


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_silence_and_quiet_noise_are_not_speech(seed):
    vad = EnergyVad(8000)
    assert events(vad, silence(1000, 8000) + noise(3000, 8000, -50, seed)) == []


def test_steady_loud_noise_is_learned_as_floor_then_speech_still_detected():
    rate = 8000
    vad = EnergyVad(rate)
    ev = events(vad, noise(5000, rate, -25, 7))
    # Noise above the absolute threshold first counts as speech, but the floor
    # climbs to it and the detector ends that "speech" within a few seconds.
    assert [e for _, e in ev] == ["speech_start", "speech_end"]
    assert ev[1][0] <= 3000
    assert not vad.speaking
    assert vad.noise_floor_db == pytest.approx(-25, abs=2)
    vad2 = EnergyVad.from_state(vad.to_state())
    speech = mix(speech_like(2000, rate, seed=5, level_db=-10), noise(2000, rate, -25, 8))
    ev = events(vad2, speech + noise(1500, rate, -25, 9))
    assert [e for _, e in ev] == ["speech_start", "speech_end"]
    assert ev[0][0] <= 200


def test_state_roundtrip_through_json_resumes_identically():
    rate = 16000
    pcm = silence(300, rate) + speech_like(2000, rate, seed=9) + silence(800, rate)
    fs = frames(pcm, rate)
    ref = EnergyVad(rate)
    expected = [ref.process(f) for f in fs]
    a = EnergyVad(rate)
    got = [a.process(f) for f in fs[:40]]
    b = EnergyVad.from_state(json.loads(json.dumps(a.to_state(), allow_nan=False)))
    got += [b.process(f) for f in fs[40:]]
    assert got == expected


def test_bad_input_named():
    with pytest.raises(ValueError, match="rate"):
        EnergyVad(11025)
    with pytest.raises(ValueError, match="threshold_db"):
        EnergyVad(8000, threshold_db=5)
    with pytest.raises(ValueError, match="hangover_ms"):
        EnergyVad(8000, hangover_ms=-1)
    with pytest.raises(ValueError, match="frame"):
        EnergyVad(8000).process(bytes(640))
    state = EnergyVad(8000).to_state()
    del state["quiet_ms"]
    with pytest.raises(ValueError, match="quiet_ms"):
        EnergyVad.from_state(state)
    with pytest.raises(ValueError, match="speaking"):
        EnergyVad.from_state({**EnergyVad(8000).to_state(), "speaking": "yes"})
