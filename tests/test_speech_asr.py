"""Recognizers: pocketsphinx with the domain LM, the ARPA builder, deepgram against a fake."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fake_deepgram import FakeDeepgram
from piopiy_voice.contracts import AudioFrame, CallEnded
from piopiy_voice.errors import PiopiyError
from piopiy_voice.speech.asr import make_recognizer
from piopiy_voice.speech.asr_pocketsphinx import build_arpa, read_corpus, tokenize
from piopiy_voice.speech.errors import RecognitionError, SpeechError
from piopiy_voice.speech.transcriber import CallTranscriber
from piopiy_voice.speech.tts import EspeakSynthesizer, to_voice_rate


def _chunks(pcm: bytes, rate: int) -> list[bytes]:
    fb = rate // 50 * 2
    return [pcm[i:i + fb] for i in range(0, len(pcm), fb)]


@pytest.fixture(scope="module")
def sphinx():
    return make_recognizer("pocketsphinx")


_FIRST_RENDER = ("import sys; from piopiy_voice.speech.tts import _Espeak; "
                 "pcm, src = _Espeak.get().render(sys.argv[1], 'en-us', 165, 50); "
                 "sys.stdout.buffer.write(src.to_bytes(4, 'little') + pcm)")


def _first_render(text: str) -> tuple[bytes, int]:
    """``text`` as espeak-ng renders it first in a fresh process (raw PCM, its
    rate). Its output depends on what the process synthesized before (measured:
    three renders of one sentence in a row gave three different signals, the
    first after loading always the same), so in the shared test process this
    test would decode whatever audio the tests before it happened to leave."""
    out = subprocess.run([sys.executable, "-c", _FIRST_RENDER, text], capture_output=True,
                         check=True, timeout=60).stdout
    return out[4:], int.from_bytes(out[:4], "little")


@pytest.fixture(scope="module")
def order_sentence():
    return _first_render("my order has not arrived")


@pytest.mark.parametrize("rate", [8000, 16000, 32000])
def test_pocketsphinx_streams_partials_then_a_final(sphinx, order_sentence, rate):
    pcm = to_voice_rate(*order_sentence, rate)
    stream = sphinx.open(rate)
    partials = []
    for chunk in _chunks(pcm, rate):
        partials += stream.feed(chunk)
    final = stream.finish()
    assert final.final and final.text == "my order has not arrived"
    assert partials and all(not p.final and p.text for p in partials)
    # At most one partial per 300 ms of audio, only when the text changed.
    assert len(partials) <= len(pcm) / 2 / rate / 0.3 + 1
    assert len({p.text for p in partials}) == len(partials)
    with pytest.raises(RecognitionError):
        stream.feed(pcm[:320])


def test_pocketsphinx_pool_reuses_decoders(sphinx):
    made = sphinx.decoders_made
    for _ in range(3):
        s = sphinx.open(16000)
        s.feed(bytes(6400))
        s.finish()
    a, b = sphinx.open(16000), sphinx.open(16000)  # two segments at once: two decoders
    a.close()
    b.close()
    assert sphinx.decoders_made <= made + 2


def test_arpa_builder_writes_a_normalised_backoff_model():
    text = build_arpa([tokenize(p) for p in ["yes please", "no thanks", "yes thanks"]])
    assert text.startswith("\\data\\\nngram 1=6\nngram 2=")
    uni = {}
    section = None
    for line in text.splitlines():
        if line.startswith("\\"):
            section = line
            continue
        if section == "\\1-grams:" and line:
            parts = line.split("\t")
            uni[parts[1]] = 10 ** float(parts[0])
    assert set(uni) == {"<s>", "</s>", "yes", "please", "no", "thanks"}
    assert abs(sum(p for w, p in uni.items() if w != "<s>") - 1.0) < 1e-3
    # The shipped corpus has the phrases the default agent needs.
    words = {w for p in read_corpus() for w in tokenize(p)}
    assert {"human", "agent", "person", "balance", "goodbye", "open"} <= words


def test_pocketsphinx_custom_corpus_and_bad_options(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("# comment\nblue\ngreen\nred zzzqqq\n")
    rec = make_recognizer("pocketsphinx", corpus=str(corpus))
    assert rec.vocabulary == {"blue", "green", "red"}  # the unknown word is dropped
    with pytest.raises(SpeechError, match="mode"):
        make_recognizer("pocketsphinx", mode="magic")
    with pytest.raises(SpeechError, match="cannot read"):
        make_recognizer("pocketsphinx", corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(SpeechError, match="unknown recognizer"):
        make_recognizer("whisper")


# ------------------------------------------------------------------ deepgram

@pytest.fixture
def dg():
    server = FakeDeepgram(["i want to speak to a human", "goodbye"])
    yield server
    server.close()


def test_deepgram_streams_interims_and_final(dg):
    rec = make_recognizer("deepgram", url=dg.url, api_key="test-key")
    stream = rec.open(8000)
    partials = []
    for chunk in _chunks(bytes(8000 * 2 * 2), 8000):  # 2 s of audio
        partials += stream.feed(chunk)
        time.sleep(0.001)
    final = stream.finish()
    assert final.text == "i want to speak to a human" and final.final and final.confidence == 0.9
    # interims arrived while audio was still being sent (the fake answers every 0.5 s)
    deadline_parts = [p.text for p in partials]
    assert deadline_parts and all(not p.final for p in partials)
    assert "i want to speak to a human".startswith(deadline_parts[-1])
    assert dg.audio_bytes == [32000]
    assert dg.queries[0]["sample_rate"] == ["8000"] and dg.queries[0]["interim_results"] == ["true"]


def test_deepgram_errors_are_recognition_errors(dg):
    with pytest.raises(RecognitionError, match="HTTP 401"):
        make_recognizer("deepgram", url=dg.url, api_key="wrong").open(8000)
    with pytest.raises(RecognitionError, match="unreachable"):
        make_recognizer("deepgram", url="ws://127.0.0.1:9/v1/listen", connect_timeout_s=1).open(8000)
    dg.mode = "garbage"
    stream = make_recognizer("deepgram", url=dg.url, api_key="test-key").open(8000)
    with pytest.raises(PiopiyError, match="malformed JSON"):
        for _ in range(50):
            stream.feed(bytes(320))
            time.sleep(0.005)
    stream.close()
    dg.mode = "hang"
    stream = make_recognizer("deepgram", url=dg.url, api_key="test-key", finish_timeout_s=0.5).open(8000)
    stream.feed(bytes(320))
    t = time.monotonic()
    with pytest.raises(RecognitionError, match="no final result within 0.5s"):
        stream.finish()
    assert time.monotonic() - t < 2
    with pytest.raises(SpeechError, match="API_KEY"):
        make_recognizer("deepgram")


def test_transcriber_core_with_deepgram(dg):
    rec = make_recognizer("deepgram", url=dg.url, api_key="test-key")
    core = CallTranscriber("c1", 8000, rec)
    pcm = bytes(320 * 25) + EspeakSynthesizer().synthesize_sync("please put me through", 8000) + bytes(320 * 40)
    out = []
    for i, f in enumerate(_chunks(pcm + bytes(-len(pcm) % 320), 8000)):
        out += core.handle(f"{i + 1}-0", AudioFrame(call_id="c1", seq=i + 1, pcm=f))
    out += core.handle("999-0", CallEnded(call_id="c1", seq=10_000, reason="hangup"))
    finals = [t for t in out if t.final]
    assert [(t.text, t.engine, t.segment) for t in finals] == [("i want to speak to a human", "deepgram", 0)]
