"""End to end: sandbox (platform) -> gateway -> Redis -> worker + transcriber ->
gateway -> sandbox, with the call placed by the dialer through RestClient. Every
role is a real process (sandbox.demo.LocalSystem). The tests of the shared
``system`` run twice: on the test Redis, and on a local Redis Cluster (3
primaries with replicas, ``tests/cluster_support.py``) with the dial queue on a
redis-server of its own (``PV_QUEUE_REDIS_URL``).

What is asserted is what a user would check by hand: the conversation in words
(what the agent heard, from the transcripts; what it said, from the commands the
gateway applied), the barge-in and the hand-off the platform received, the
call's states in Redis, the audio the workers got (no frame lost, a gap exactly
where the stream was paused, no card digits), and that nothing is left behind
when a call or the system ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from piopiy_voice.sandbox.demo import ROLES, LocalSystem, check_flow
from piopiy_voice.sandbox.expect import check_expectations, contains
from piopiy_voice.sandbox.scenario import load_scenario
from piopiy_voice import keys
from piopiy_voice.audio import DtmfDetector
from piopiy_voice.contracts import AudioFrame, Playout, decode
from piopiy_voice.redisconn import EmbeddedRedis

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT_S = 90
PAUSE_RESUME_S = 2.0


@pytest.fixture(scope="module", params=["redis", "cluster"])
def system(request, redis_url, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"e2e-{request.param}")
    env = {"PV_PAUSE_RESUME_AFTER_S": str(PAUSE_RESUME_S)}
    queue = None
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.heal()
        cluster.flushall()
        queue = EmbeddedRedis()
        s = LocalSystem(out, cluster.url, queue_url=queue.url, extra_env=env)
    else:
        s = LocalSystem(out, redis_url, extra_env=env)
        s.r.flushdb()
    try:
        s.start()
        yield s
    finally:
        codes = s.stop()
        if queue is not None:
            queue.close()
        assert all(code == 0 for code in codes.values()), codes


def timeline_events(system: LocalSystem, call_id: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in system.r.xrange(keys.call_timeline(call_id))
    ]


def received_messages(report: dict) -> list[dict]:
    return [e for e in report["events"] if e["src"] == "gateway" and e["event"] == "ws_message"]


def control_sequence(report: dict) -> list[str]:
    """Non-audio messages the platform received, in order."""
    out = []
    for e in received_messages(report):
        if e.get("kind") == "control":
            out.append(e["action"])
        elif e.get("kind") == "pcmo":
            out.append("pcmo:" + "+".join(e["actions"]))
    return out


def audio_entries(system: LocalSystem, call_id: str) -> list[tuple[int, AudioFrame]]:
    """(entry time ms, frame) of every audio entry the workers could read."""
    out = []
    for entry_id, fields in system.r.xrange(keys.call_stream(call_id)):
        if fields.get(b"type") == b"audio":
            out.append((int(entry_id.split(b"-")[0]), decode(fields)))
    return out


def write_scenario(path: Path, steps: list[dict], **extra) -> str:
    path.write_text(json.dumps({"name": path.stem, "max_duration_s": 60, "steps": steps, **extra}))
    return str(path)


def stream_messages(system: LocalSystem, call_id: str, kind: type) -> list:
    want = kind.model_fields["type"].default.encode()
    return [decode(f) for _, f in system.r.xrange(keys.call_stream(call_id)) if f.get(b"type") == want]


def test_demo_is_a_real_conversation(system):
    call_id = system.enqueue(scenario="demo")
    record = system.wait_ended(call_id, CALL_TIMEOUT_S)
    report = system.sandbox_report(record["request_id"])
    words = system.words(call_id)

    assert check_flow(report, record) == []
    # The scenario's own expectations: what the agent heard and said, in words.
    result = check_expectations(load_scenario("demo").expect, words)
    assert result.ok, (result.missing, words.lines)
    # It heard the question and the request for a person (final transcripts, channel caller).
    assert contains(words.caller, "opening hours") and contains(words.caller, "real person")
    # What the gateway applied, in order, with what the agent said.
    spoken = [(e["event"], e.get("text", "")) for e in timeline_events(system, call_id)
              if e["event"].startswith("command.")]
    events = [name for name, _ in spoken]
    greeting = spoken[0]
    assert greeting[0] == "command.play_audio" and "How can I help you" in greeting[1]
    answer = next(i for i, (name, text) in enumerate(spoken)
                  if name == "command.play_audio" and "open Monday to Friday" in text)
    interrupt = events.index("command.interrupt")
    transfer = events.index("command.transfer")
    assert 0 < answer < interrupt < transfer, spoken  # answered in speech, then cut off
    assert spoken[transfer - 2] == ("command.play_audio", "Please hold while I connect you to a person.")
    assert events[transfer - 1] == "command.play_music"
    assert events.count("command.transfer") == 1 and events[-1] == "command.transfer", spoken
    # Interrupted while the answer was playing: the gateway's playout report of that
    # utterance says it was cut part-way, and the platform got the break.
    cut = [p for p in stream_messages(system, call_id, Playout) if p.state == "interrupted"]
    assert len(cut) == 1 and 0 < cut[0].played_ms < cut[0].total_ms and cut[0].total_ms > 3000, cut
    assert control_sequence(report) == ["break", "pcmo:play", "pcmo:bridge"]
    assert any(e["event"] == "playback_cut" for e in report["events"])
    break_at = next(e["t_ms"] for e in received_messages(report) if e.get("action") == "break")
    barge_in = [e for e in report["events"] if e["src"] == "caller" and e["event"] == "say_start"][1]
    assert 0 <= break_at - barge_in["t_ms"] < 1000, (barge_in, break_at)
    # Handed off by words, not by key: the caller never pressed one.
    assert not [e for e in report["events"] if e["src"] == "caller" and e["event"] == "dtmf"]
    assert received_messages(report)[0].get("kind") not in ("control", "pcmo")  # greeting audio first
    assert report["malformed"] == []
    # Monitoring after the bridge: the stream stayed up and the conversation was transcribed.
    bridge_at = next(e["t_ms"] for e in received_messages(report) if "bridge" in e.get("actions", []))
    assert report["stream"]["runs"][-1]["end_ms"] > bridge_at + 3000
    assert len(words.conversation) >= 2, words.lines
    transferred = next(ln.t for ln in words.lines if ln.who == "agent" and "Please hold" in ln.text)
    assert all(ln.t > transferred for ln in words.lines if ln.who == "conversation")
    assert all(ln.t < transferred + 1 for ln in words.lines if ln.who == "caller")
    # The call's life in Redis.
    # Queued is kept on the record (a timeline stream per queued call cost
    # two thirds of its memory); the timeline starts when the call is dialed.
    states = [e["event"] for e in timeline_events(system, call_id) if e["event"].startswith("state.")]
    assert states == ["state.dialing", "state.placed", "state.live", "state.ended"]
    assert float(record["queued_at"]) <= float(timeline_events(system, call_id)[0]["t"])
    assert record["state"] == "ended" and record["end_reason"] == "platform_closed"
    # Every frame the platform sent reached the workers' stream, in order.
    frames = audio_entries(system, call_id)
    assert len(frames) == report["stream"]["frames_sent"]
    assert [f.seq for _, f in frames] == sorted(f.seq for _, f in frames)


def test_seed_example_runs_unchanged_against_the_sandbox(system):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed_example.py"), "919812345670"],
        env=system.env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["reply"]["code"] == 200 and out["reply"]["status"] == "progress"
    report = system.sandbox_report(out["reply"]["request_id"], wait=40)
    executed = [e["action"] for e in report["events"] if e["event"] == "action"]
    assert executed == ["stream", "play", "hangup"]
    assert report["end_reason"] == "hangup_pcmo"
    assert report["stream"]["listen_mode"] == "callee" and report["stream"]["frames_sent"] > 0
    # The gateway took the socket the seed's signed ws_url pointed at.
    record = system.wait_ended(out["call_id"], 30)
    assert record["state"] == "ended" and record["gateway_id"] == system.env["PV_GATEWAY_ID"]


def test_pause_leaves_a_gap_exactly_where_the_stream_was_paused(system, tmp_path):
    scenario = write_scenario(tmp_path / "card.json", [
        {"wait_for": "agent_audio", "timeout_ms": 10000},
        {"wait_for": "agent_silence", "min_silence_ms": 700, "timeout_ms": 15000},
        {"dtmf": "*", "tone_ms": 120},  # the agent's pause key
        {"silence": 800},
        {"dtmf": "4111", "tone_ms": 100, "gap_ms": 100},  # card digits: must never reach us
        {"silence": 3000},
        {"say": {"ms": 800, "seed": 5}},
        {"silence": 300},
        {"hangup": True},
    ])
    call_id = system.enqueue(scenario=scenario)
    record = system.wait_ended(call_id, CALL_TIMEOUT_S)
    report = system.sandbox_report(record["request_id"])

    stream = report["stream"]
    assert len(stream["paused_ranges"]) == 1, stream["paused_ranges"]
    assert len(stream["runs"]) == 2, stream["runs"]
    issued = [e["command"] for e in timeline_events(system, call_id) if e["event"] == "worker.command"]
    assert issued[:3] == ["cmd.play_audio", "cmd.pause", "cmd.resume"], issued
    assert control_sequence(report)[:2] == ["pause", "resume"]

    frames = audio_entries(system, call_id)
    assert len(frames) == stream["frames_sent"]
    # Split what the workers received where entry times jump: exactly one gap,
    # with exactly the frames of each run the platform sent on either side.
    gaps = [i for i in range(1, len(frames)) if frames[i][0] - frames[i - 1][0] > 500]
    assert len(gaps) == 1, gaps
    assert gaps[0] == stream["runs"][0]["frames"]
    pause_start, pause_end = stream["paused_ranges"][0]
    paused_ms = pause_end - pause_start
    gap_ms = frames[gaps[0]][0] - frames[gaps[0] - 1][0]
    assert abs(gap_ms - paused_ms) < 300, (gap_ms, paused_ms)
    # The pause key reached us; the card digits did not.
    detector = DtmfDetector(8000)
    heard = [k for _, f in frames for k in detector.process(f.pcm)]
    assert heard == ["*"]
    pressed = [e.get("keys") for e in report["events"] if e["src"] == "caller" and e["event"] == "dtmf"]
    assert pressed == ["*", "4111"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_caller_hanging_up_mid_utterance_leaves_nothing_behind(redis_url, tmp_path):
    with LocalSystem(tmp_path, redis_url) as s:
        s.start()
        call_id = s.enqueue(scenario="hangup_mid_utterance")
        record = s.wait_ended(call_id, CALL_TIMEOUT_S)
        report = s.sandbox_report(record["request_id"])
        assert report["end_reason"] == "caller_hangup"
        assert record["state"] == "ended" and record["end_reason"] == "platform_closed"
        # The worker and the transcriber let go: no lease, nothing pending in their groups.
        def released():
            return (not s.r.exists(keys.call_lease(call_id))
                    and not s.r.exists(keys.call_asr_lease(call_id))
                    and s.r.xpending(keys.CALLS_STREAM, keys.WORKERS_GROUP)["pending"] == 0
                    and s.r.xpending(keys.CALLS_STREAM, keys.TRANSCRIBERS_GROUP)["pending"] == 0)
        deadline = time.monotonic() + 10
        while not released() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert released()
        # Every key of the call is set to expire; nothing of it lives forever.
        for key in s.r.scan_iter(match=f"*{{{call_id}}}*"):
            assert s.r.ttl(key) > 0, key
        pgids = [role.proc.pid for role in s.roles]
        codes = s.stop()
    assert codes == {role: 0 for role in ROLES}
    assert not any(_group_alive(pgid) for pgid in pgids)
