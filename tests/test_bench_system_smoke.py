"""bench/system_bench.py: its pure parts, and 2 calls for 3 s through the whole system."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from types import ModuleType

import pytest

from examples_support import BENCH, load_bench


@pytest.fixture(scope="module")
def sb() -> ModuleType:
    load_bench("callsim")
    load_bench("bargein_bench")
    return load_bench("system_bench")


def test_barge_in_pairs_each_onset_with_the_first_break_before_the_next_onset(sb):
    calls = [{"call_id": "a", "onsets": [(1000, "barge", "x"), (3000, "ask", "y"), (5000, "barge", "z"),
                                         (9000, "barge", "x")],
              "breaks": [1090, 1500, 5200, 9990]},
             {"call_id": "b", "onsets": [(2000, "barge", "x"), (4000, "barge", "x")], "breaks": [4100]}]
    lat, missed, pairs = sb.barge_latencies(calls, 0, 8000)  # the onset at 9000 is after the window
    assert sorted(lat) == [90, 100, 200] and missed == 1  # b's first barge-in got no break
    assert sorted(pairs) == [(90, "x"), (100, "x"), (200, "z")]
    assert sorted(sb.barge_latencies(calls, 1500, 8000)[0]) == [100, 200]
    assert sorted(sb.barge_latencies(calls, 0, 10_000)[0]) == [90, 100, 200, 990]  # 9000 -> 9990


def test_command_to_socket_uses_the_latest_interrupt_before_each_break_once(sb):
    calls = [{"call_id": "a", "breaks": [1090.4, 5200.0, 7000.0]}]
    got = sb.command_latencies(calls, {"a": [1080, 1088, 5190]}, 0, 10_000)
    assert got == pytest.approx([2.4, 10.0])  # 7000 has no interrupt left: not paired


def test_lag_growing_needs_both_the_floor_and_the_doubling(sb):
    assert not sb.lag_growing([0.02, 0.09])
    assert not sb.lag_growing([0.3, 0.4])
    assert sb.lag_growing([0.03, 0.25])


def _speech(sb, rate=8000):
    fb = sb.frame_bytes(rate)
    loud = sb.client_frame(b"\x10\x20" * (fb // 2))
    utt = sb.Utterance("hello", (sb.client_frame(bytes(fb)),) + (loud,) * 10, 1, 10)
    return sb.Speech(rate, sb.client_frame(bytes(fb)), (loud, loud), {"hello": utt})


def test_the_caller_barges_in_then_lets_every_third_answer_finish_and_presses_the_key(sb):
    script = sb.CallerScript(_speech(sb), random.Random(1))
    t = 100.0
    for _ in range(3000):  # 60 s
        t += 0.02
        if not script.speaking and script.since is not None and t - script.since > 0.5 and t - script.since < 2.5:
            script.on_agent_audio(t)  # the agent answers 0.5 s after each question, for 2 s
        script.next_frame(t)
    kinds = [k for _, k, _ in script.onsets]
    assert kinds.count("barge") >= 5 and "ask" in kinds
    assert script.keys >= 2 and script.no_reply == 0
    assert len(script.finals) == len(script.onsets) or len(script.finals) == len(script.onsets) - 1
    # a barge-in starts 0.3-1.2 s after the agent's audio started
    starts = [t for t, what in script.trace if what == "agent audio"]
    for t_on, kind, _ in script.onsets:
        if kind == "barge":
            before = max(s for s in starts if s * 1000 <= t_on)
            assert 0.3 <= t_on / 1000 - before <= 1.2 + 0.05


@pytest.mark.e2e
def test_two_calls_through_the_whole_system(tmp_path):
    out = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, str(BENCH / "system_bench.py"), "--calls", "2", "--seconds", "3",
                           "--warmup", "0", "--json", str(out), "--log-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    (step,) = json.loads(out.read_text())
    assert step["connected"] == 2
    assert step["sent"] >= 2 * 50 * 3 * 0.9 and step["lost"] == 0 and step["audio"] == step["sent"]
    assert step["commands"] >= 2  # at least the two greetings went through the gateway's command stream
    assert step["cpu_ms_per_call_s"]["gateway"] > 0 and step["cpu_ms_per_call_s"]["workers"] > 0
    assert step["kb_per_queued"] > 0
    assert "Traceback" not in proc.stderr
