"""bench/voice_bench.py transcriber: how a question is matched with its final
(latency and WER of what was heard), and a 2-call run of the real role."""

from __future__ import annotations

import pytest

from examples_support import load_bench


@pytest.fixture(scope="module")
def vb():
    load_bench("asr_bench")
    load_bench("callsim")
    return load_bench("voice_bench")


def test_final_latency_is_speech_end_to_the_first_final_before_the_next_question(vb):
    asked = [("where is my order", 1000, 2000), ("hello", 5000, 5600), ("no thank you", 9000, 9800),
             ("cut off", 12000, 12500)]
    finals = [(1500, "where"),            # mid-question (a pause): heard, but not "after the end"
              (2450, "is my order"),      # the final of question 1: 450 ms
              (9100, "noise")]            # question 2 got no final before question 3 began
    lat, errs, words, missing = vb._final_latencies(asked, finals, since=1500)
    assert lat == [450]                   # q3 has no final; q4 is cut off by the run's end
    assert missing == 2
    # q1 heard whole (0 errors / 4 words), q2 nothing (1 / 1), q3 "noise" (3 / 3)
    assert (errs, words) == (4, 8)
    # Questions that ended before the window are not counted.
    assert vb._final_latencies(asked, finals, since=2001)[0] == []


def test_two_calls_through_the_real_transcriber(vb, capsys):
    vb.main(["transcriber", "--calls", "2", "--seconds", "6", "--warmup", "2"])
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.strip().startswith("working tree")][0]
    assert "ms per talking call-second" in line and "speech end -> final: n=" in line
    assert "KiB per call" in line and "WER of the finals" in line
