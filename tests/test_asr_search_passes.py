"""The pocketsphinx engine's search passes: the second (fwdflat) pass is off
by default (it ran inside ``finish()``, after the caller stopped: CPU and
latency for no accuracy on the domain LM; speech.asr_pocketsphinx), can be
turned back on, and finals keep their text and confidence (the lattice pass
stays)."""

from __future__ import annotations

import time

import pytest

from piopiy_voice.speech.asr import make_recognizer
from piopiy_voice.speech.tts import EspeakSynthesizer


def _decode(rec, pcm: bytes, rate: int):
    s = rec.open(rate)
    fb = rate // 50 * 2
    for i in range(0, len(pcm), fb):
        s.feed(pcm[i:i + fb])
    t = time.process_time()
    hyp = s.finish()
    return hyp, time.process_time() - t


@pytest.fixture(scope="module")
def recognizers():
    return make_recognizer("pocketsphinx"), make_recognizer("pocketsphinx", second_pass=True)


def test_second_pass_is_off_by_default_and_can_be_turned_on(recognizers):
    one, two = recognizers
    assert one._idle[8000][0].config["fwdflat"] is False
    assert two._idle[8000][0].config["fwdflat"] is True
    assert one._idle[8000][0].config["bestpath"] is True   # the lattice (confidence) stays


@pytest.mark.parametrize("rate", [8000, 16000])
def test_one_pass_finals_keep_text_and_confidence_and_finish_sooner(recognizers, rate):
    one, two = recognizers
    pcm = EspeakSynthesizer().synthesize_sync("i want to speak to an agent about my order", rate)
    _decode(one, pcm, rate)   # first open at the rate calibrates
    _decode(two, pcm, rate)
    h1, t1 = min((_decode(one, pcm, rate) for _ in range(3)), key=lambda r: r[1])
    h2, t2 = min((_decode(two, pcm, rate) for _ in range(3)), key=lambda r: r[1])
    assert h1.final and h1.text.startswith("i want to speak")
    assert h1.confidence is not None and 0.0 <= h1.confidence <= 1.0
    assert h2.text.startswith("i want to speak")
    # finish() without the re-decode of the utterance: several times cheaper
    # (measured ~7x); 2x leaves room for a noisy machine.
    assert t1 * 2 < t2
