"""The gateway's playout tick fed directly: a fake clock, fake sockets, real sessions."""

from __future__ import annotations

import base64
import json
import random

import pytest

from piopiy_voice import contracts as c
from piopiy_voice.gateway.metrics import Metrics
from piopiy_voice.gateway.playout import MAX_SLACK_S, PlayoutTick, Timetable, slack_for
from piopiy_voice.gateway.registry import HELD_RETRY_S, LiveCall
from piopiy_voice.gateway.session import CHUNK_MS, CallSession


class FakeLoop:
    """``time()`` and ``call_at()``; ``run_until`` fires the timers in time order."""

    class Handle:
        def __init__(self, when, cb):
            self.when, self.cb, self.cancelled = when, cb, False

        def cancel(self):
            self.cancelled = True

    def __init__(self, now=100.0):
        self.now = now
        self.timers: list[FakeLoop.Handle] = []
        self.fired = 0

    def time(self):
        return self.now

    def call_at(self, when, cb):
        h = self.Handle(when, cb)
        self.timers.append(h)
        return h

    def armed(self):
        return [h for h in self.timers if not h.cancelled]

    def run_until(self, end):
        for _ in range(100_000):  # bounded
            armed = self.armed()
            if not armed or min(h.when for h in armed) > end:
                break
            h = min(armed, key=lambda h: h.when)
            self.timers.remove(h)
            self.now = max(self.now, h.when)
            self.fired += 1
            h.cb()
        else:
            raise AssertionError("timers did not settle")
        self.now = max(self.now, end)


class FakeWs:
    """DirectConnection's write API, recording (time, message)."""

    def __init__(self, loop):
        self.loop = loop
        self.state = "open"
        self.out: list[tuple[float, str]] = []

    def write_state(self):
        return self.state

    def write_texts(self, texts):
        assert self.state == "open", "written while not open"
        self.out += [(self.loop.now, t) for t in texts]


class FakePublisher:
    def __init__(self):
        self.entries = []

    def audio_prefix(self, call_id):
        return call_id.encode()

    def add_audio(self, prefix, seq, pcm):
        return True

    def xadd(self, key, fields, maxlen=None):
        self.entries.append((key, c.decode(fields)))


def _calls(n, loop, *, lead_ms=100, rate=16000):
    metrics, pub = Metrics(), FakePublisher()
    tick = PlayoutTick(lead_ms=lead_ms, metrics=metrics, loop=loop)
    calls = []
    for i in range(n):
        s = CallSession(f"call-{i}", rate=rate, lead_ms=lead_ms)
        calls.append(LiveCall(s, FakeWs(loop), None, pub, metrics, tick))
    return tick, calls, metrics, pub


def _pcm_of(out):
    return b"".join(base64.b64decode(json.loads(m)["data"]["audioData"])
                    for _, m in out if m.startswith('{"type":"streamAudio"'))


def _play(live, ms, uid="u", rate=16000, seed=0):
    pcm = random.Random(seed).randbytes(rate * 2 * ms // 1000)
    out = live.session.apply(c.PlayAudio(call_id=live.call_id, pcm=pcm, rate=rate,
                                         utterance_id=uid), live._tick._loop.time())
    assert out.status == "applied" and out.wake_playout
    live.start_playout()
    return pcm


def _playouts(pub, call_id):
    return [(e.utterance_id, e.state, e.played_ms) for key, e in pub.entries
            if e.type == "playout" and e.call_id == call_id]


# ------------------------------------------------------------------ timetable

def test_timetable_pops_due_keys_in_time_order_once():
    t = Timetable()
    for key, due in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("d", 9.0)):
        t.set(key, due)
    t.set("c", 1.5)      # re-timed: its old entry (3.0) is stale
    t.discard("b")
    assert t.next_due() == 1.0 and len(t) == 3 and "b" not in t
    assert t.pop_due(5.0) == ["a", "c"]
    assert t.pop_due(5.0) == [] and t.next_due() == 9.0
    t.set("a", 9.0)      # same time as d: both due, in insertion order
    assert t.pop_due(9.0) == ["d", "a"] and t.next_due() is None and len(t) == 0


def test_timetable_stays_small_when_keys_are_retimed_often():
    t = Timetable()
    for i in range(10_000):
        t.set(i % 10, 1000.0 - i * 0.01)  # each re-time leaves a stale entry behind
    assert len(t) == 10 and len(t._heap) <= 2 * 10 + 64 + 1
    assert sorted(t.pop_due(2000.0)) == list(range(10))


def test_slack_is_a_quarter_of_the_lead_at_most_20_ms():
    assert slack_for(100) == MAX_SLACK_S == 0.020
    assert slack_for(40) == pytest.approx(0.010)
    assert slack_for(0) == 0.0
    assert slack_for(1000) == MAX_SLACK_S


# --------------------------------------------------------------- the tick

class Recorder:
    """A call that is due at the times given and records when it was served."""

    def __init__(self, dues):
        self.dues, self.served = list(dues), []

    def play_due(self, now):
        self.served.append(now)
        return self.dues.pop(0) if self.dues else None


def test_one_wake_serves_every_call_due_within_the_slack_never_early():
    loop = FakeLoop(now=0.0)
    tick = PlayoutTick(lead_ms=100, metrics=Metrics(), loop=loop)
    a, b, c_, d = Recorder([0.100]), Recorder([0.105]), Recorder([0.118]), Recorder([0.130])
    for call in (a, b, c_, d):
        tick.wake(call)           # served at once (first chunks), then due as given
    assert [x.served for x in (a, b, c_, d)] == [[0.0]] * 4
    assert tick.timer_at == pytest.approx(0.120)   # earliest due + 20 ms slack
    loop.run_until(0.125)
    # a, b and c were due by 0.120: one wake; d (0.130) was not due yet: not served early.
    assert a.served[1:] == b.served[1:] == c_.served[1:] == [pytest.approx(0.120)]
    assert d.served == [0.0] and loop.fired == 1
    assert tick.timer_at == pytest.approx(0.150)
    loop.run_until(1.0)
    assert d.served[1:] == [pytest.approx(0.150)] and len(tick) == 0


def test_many_calls_paced_by_the_pacer_chunks_never_early_at_most_slack_late():
    random.seed(7)
    loop = FakeLoop()
    tick, calls, metrics, pub = _calls(60, loop, lead_ms=100)
    t0 = loop.now
    pcms = {}
    # Utterances start at random phases over one chunk, as commands arrive.
    starts = sorted((random.uniform(0, 0.040), live) for live in calls)
    for at, live in starts:
        loop.run_until(t0 + at)
        pcms[live.call_id] = (loop.now, _play(live, 1000, seed=hash(live.call_id) % 997))
    loop.run_until(t0 + 2.0)
    lead, chunk, slack = 0.100, CHUNK_MS / 1000, tick.slack
    chunks = 0
    for live in calls:
        start, pcm = pcms[live.call_id]
        out = live.ws.out
        assert _pcm_of(out) == pcm                  # every byte, in order
        for k, (t, _) in enumerate(out):
            ideal = max(start, start + k * chunk - lead)   # when the Pacer may release chunk k
            assert t >= ideal - 1e-9, (live.call_id, k)    # never early
            assert t <= ideal + slack + 1e-9, (live.call_id, k, t - ideal)  # at most slack late
        chunks += len(out)
        assert _playouts(pub, live.call_id) == [("u", "started", 0), ("u", "finished", 1000)]
    assert chunks == 60 * 25
    # One wake per slack at most (plus the finishing reports), not one per chunk.
    assert metrics.c["playout_ticks"] <= 2.0 / slack + 10, metrics.c["playout_ticks"]
    assert metrics.c["messages_out"] == chunks and len(tick) == 0


def test_cut_stops_writes_and_the_break_follows_the_last_chunk():
    loop = FakeLoop()
    tick, (live, other), metrics, pub = _calls(2, loop)
    _play(live, 2000)
    _play(other, 400, uid="o")
    loop.run_until(loop.now + 0.5)
    # The dispatcher's interrupt: the session cuts, the tick lets go, the break is sent.
    out = live.session.apply(c.Interrupt(call_id=live.call_id), loop.now)
    live.cut_playout()
    live.ws.write_texts(out.messages)
    assert live not in tick
    sent = len(live.ws.out)
    loop.run_until(loop.now + 1.0)
    assert len(live.ws.out) == sent and live.ws.out[-1][1] == '{"action":"break"}'
    assert all("streamAudio" in m for _, m in live.ws.out[:-1])
    [(uid, state, played)] = [(e.utterance_id, e.state, e.played_ms) for e in out.entries]
    audio_ms = len(_pcm_of(live.ws.out)) * 1000 // 32000
    assert (uid, state) == ("u", "interrupted") and 450 <= played <= audio_ms <= 650
    # The other call was not touched by the cut.
    assert len(_pcm_of(other.ws.out)) == 16000 * 2 * 400 // 1000
    assert _playouts(pub, other.call_id)[-1] == ("o", "finished", 400)


def test_a_socket_above_its_high_water_mark_holds_the_call_without_loss():
    loop = FakeLoop()
    tick, (slow, ok), metrics, pub = _calls(2, loop)
    pcm = _play(slow, 1000)
    _play(ok, 1000, uid="o")
    loop.run_until(loop.now + 0.2)
    slow.ws.state = "full"           # the platform stopped reading
    held_at = len(slow.ws.out)
    queued = slow.session.queued_ms(loop.now)
    loop.run_until(loop.now + 2.0)
    assert len(slow.ws.out) == held_at               # nothing written (write_texts asserts too)
    assert metrics.c["playout_held"] >= 2.0 / (HELD_RETRY_S + tick.slack) - 2  # asked every chunk
    # Nothing was released while held: the Pacer still holds the rest (its clock waited).
    assert slow.session.queued_ms(loop.now) >= queued - 200
    assert len(_pcm_of(ok.ws.out)) == len(pcm)       # the other call played on
    slow.ws.state = "open"
    loop.run_until(loop.now + 2.0)
    assert _pcm_of(slow.ws.out) == pcm               # resumed, nothing lost, in order
    assert _playouts(pub, slow.call_id)[-1] == ("u", "finished", 1000)


def test_an_exception_in_one_call_does_not_stop_the_others():
    loop = FakeLoop()
    tick, calls, metrics, pub = _calls(3, loop)
    pcms = [_play(live, 600, seed=i) for i, live in enumerate(calls)]
    loop.run_until(loop.now + 0.2)
    bad = calls[1]
    real_pump = bad.session.pump

    def boom(now):
        raise RuntimeError("bug in one call")

    bad.session.pump = boom
    loop.run_until(loop.now + 1.0)
    assert metrics.c["playout_errors"] == 1 and bad not in tick
    assert _pcm_of(calls[0].ws.out) == pcms[0] and _pcm_of(calls[2].ws.out) == pcms[2]
    # A later wake (new audio) serves it again.
    bad.session.pump = real_pump
    bad.start_playout()
    loop.run_until(loop.now + 1.0)
    assert _pcm_of(bad.ws.out) == pcms[1]


def test_suspended_or_closed_sockets_leave_the_tick():
    loop = FakeLoop()
    tick, (gone, closing), metrics, pub = _calls(2, loop)
    _play(gone, 1000)
    _play(closing, 1000)
    gone.ws, closing.ws.state = None, "closed"
    loop.run_until(loop.now + 0.5)
    assert len(tick) == 0 and closing.ws.out and len(closing.ws.out) <= 4
    tick.close()
    assert tick.timer_at is None and not loop.armed()
