"""WebhookAgent against HTTP servers on 127.0.0.1: its POSTs run as works."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from piopiy_voice import contracts as c
from piopiy_voice.audio import frame_bytes, silence, speech_like
from piopiy_voice.settings import Settings
from piopiy_voice.workers.agent.base import Cancel, Tick, Work
from piopiy_voice.workers.agent.default import prompt
from piopiy_voice.workers.agent.webhook import WebhookAgent
from piopiy_voice.workers.runtime import run_now

T0 = 1_000_000.0
GREETING_S = len(prompt("greeting", 8000)) / 16000


def _settings(**kw):
    base = dict(PV_SILENCE_TIMEOUT_S="2", PV_PAUSE_RESUME_AFTER_S="3", PV_MAX_CALL_S="60",
                PV_HUMAN_AGENT_NUMBER="919000000042", PIOPIY_CALLER_ID="918000000001",
                PV_AGENT_WEBHOOK_TIMEOUT_S="0.3")
    base.update(kw)
    return Settings.from_env(base)


class Hook:
    """A webhook whose reply is set per test; records what it was sent."""

    def __init__(self):
        self.received: list[dict] = []
        self.reply: object = {"commands": []}
        self.status = 200
        self.delay = 0.0
        self.trickle = 0.0  # > 0: send the body one byte at a time, this far apart
        self.trickle_headers = False  # send headers one byte every 0.1 s, for 5 s
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers["Content-Length"])
                hook.received.append(json.loads(self.rfile.read(n)))
                if hook.trickle_headers:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for b in b"X-Slow: " + b"a" * 50:
                        try:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.1)
                    return
                time.sleep(hook.delay)
                body = hook.reply if isinstance(hook.reply, bytes) else json.dumps(hook.reply).encode()
                self.send_response(hook.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not hook.trickle:
                    self.wfile.write(body)
                    return
                for i in range(len(body)):
                    try:
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(hook.trickle)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/turn"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


class Sim:
    """Feeds a WebhookAgent 20 ms frames with stream times; runs every work it
    asks for at once (``run_now``) and feeds the results back, like the runtime
    and the worker would (without the network delay being stream time)."""

    def __init__(self, settings, agent_cls=WebhookAgent, rate=8000, run_works=True, params=None):
        self.call = c.CallStarted(call_id="call-1", gateway_id="gw", rate=rate, started_at=T0,
                                  params={"tts": "platform", **(params or {})})
        self.settings = settings
        self.agent = agent_cls(self.call, settings)
        self.rate = rate
        self.t = T0
        self.log: list[tuple[float, Any]] = []
        self.works: list[Work] = []
        self.cancels: list[str] = []
        self.results: list[c.WorkDone] = []
        self.work_s: list[float] = []
        self.run_works = run_works
        self._emit(self.agent.on_event(self.call, self.t))

    def _emit(self, items):
        for item in items:
            if isinstance(item, Work):
                self.works.append(item)
                if self.run_works:
                    self.finish(item)
            elif isinstance(item, Cancel):
                self.cancels.append(item.work_id)
            else:
                self.log.append((round(self.t - T0, 2), item))

    def finish(self, work, results=None):
        t0 = time.monotonic()
        results = results if results is not None else run_now(self.call.call_id, work)
        self.work_s.append(time.monotonic() - t0)
        for done in results:
            self.results.append(done)
            self.event(done)

    def audio(self, pcm):
        fb = frame_bytes(self.rate)
        for i in range(0, len(pcm) - fb + 1, fb):
            self.t += 0.02
            self._emit(self.agent.on_event(c.AudioFrame(call_id="call-1", pcm=pcm[i:i + fb]), self.t))

    def silence(self, ms):
        self.audio(silence(ms, self.rate))

    def speech(self, ms, seed=1):
        self.audio(speech_like(ms, rate=self.rate, seed=seed))

    def event(self, ev):
        self._emit(self.agent.on_event(ev, self.t))

    def said(self, text, segment=0, speech_ms=900, seed=1):
        """The caller says ``text``: speech, then the transcriber's final, then silence."""
        self.speech(speech_ms, seed=seed)
        self.silence(100)
        self.event(c.Transcript(call_id="call-1", segment=segment, text=text, final=True))
        self.silence(600)

    def kinds(self):
        out = []
        for _, cmd in self.log:
            name = cmd.type
            if cmd.type == "cmd.play_audio":
                name += ":" + cmd.utterance_id.split(":")[1]
            out.append(name)
        return out


def _sim(hook, **kw):
    return Sim(_settings(PV_AGENT_WEBHOOK_URL=hook.url, **kw))


def test_turn_events_posted_as_works_and_reply_commands_used(hook):
    hook.reply = {"commands": [{"type": "cmd.speak", "text": "Hi from the hook"}]}
    s = _sim(hook)
    assert [w.name for w in s.works] == ["webhook"] and s.works[0].id == "call-1:w1"
    assert s.kinds() == ["cmd.speak"] and s.log[0][1].text == "Hi from the hook"
    assert hook.received[0]["event"] == "call_started" and hook.received[0]["rate"] == 8000
    hook.reply = {"commands": [{"type": "cmd.play_audio", "prompt": "reply"},
                               {"type": "cmd.play_audio", "pcm_b64": base64.b64encode(b"\0\0" * 80).decode()}]}
    s.silence(2000)
    s.said("what are your opening hours")
    assert s.kinds() == ["cmd.speak", "cmd.play_audio:hook", "cmd.play_audio:hook"]
    turn = hook.received[-1]
    assert turn["event"] == "caller_turn" and turn["turn"] == 1
    assert turn["text"] == "what are your opening hours"
    assert 700 <= turn["speech_ms"] <= 1500 and "pcm" not in json.dumps(turn)
    assert s.log[1][1].pcm == prompt("reply", 8000)
    assert s.log[2][1].rate == 8000 and len(s.log[2][1].pcm) == 160
    # Barge-in stays local: no POST, still an instant Interrupt.
    n_posts = len(hook.received)
    s.speech(300)
    assert s.kinds()[-1] == "cmd.interrupt" and len(hook.received) == n_posts


def test_a_reply_is_not_waited_for_and_barge_in_cancels_it(hook):
    """The agent returns the work and keeps deciding; the caller talking over
    the wait cancels the POST and its late answer is dropped."""
    hook.reply = {"commands": [{"type": "cmd.play_audio", "prompt": "reply"}]}
    s = Sim(_settings(PV_AGENT_WEBHOOK_URL=hook.url), run_works=False)
    s.finish(s.works[0])
    s.silence(int(GREETING_S * 1000) + 500)
    s.said("hello there")
    asked = s.works[-1]
    assert asked.args[1]["event"] == "caller_turn" and s.kinds() == ["cmd.play_audio:hook"]
    s.speech(300, seed=7)  # the caller goes on talking: the reply in flight is cancelled
    assert s.cancels == [asked.id]
    s.finish(asked)  # the answer arrives late: dropped
    assert s.kinds() == ["cmd.play_audio:hook"]


def test_caller_turn_carries_the_final_transcript_and_partials(hook):
    s = _sim(hook, PV_AGENT_WEBHOOK_PARTIALS="1", PV_SILENCE_TIMEOUT_S="8")
    hook.reply = {"commands": []}
    s.silence(int(GREETING_S * 1000) + 300)
    s.speech(900)
    s.event(c.Transcript(call_id="call-1", segment=0, text="I want", final=False))
    s.silence(100)
    s.event(c.Transcript(call_id="call-1", segment=0, text="I want a person", final=True,
                         start_ms=3000, end_ms=3900))
    s.silence(600)
    assert [e["event"] for e in hook.received] == ["call_started", "caller_partial", "caller_turn"]
    assert hook.received[1]["text"] == "I want" and hook.received[1]["segment"] == 0
    turn = hook.received[-1]
    assert turn["text"] == "I want a person" and turn["turn"] == 1


def test_say_is_spoken_with_the_synthesizer_or_the_platform(hook, monkeypatch):
    import piopiy_voice.workers.agent.webhook as wh

    hook.reply = {"say": "Hello there."}
    s = _sim(hook)  # the call's tts param is "platform": the platform speaks
    assert s.kinds() == ["cmd.speak"] and s.log[0][1].text == "Hello there."

    class Fake:
        async def synthesize(self, text, rate):
            return b"\x01\x00" * (rate // 10)

    monkeypatch.setattr(wh, "SYNTHESIZER", Fake())
    hook.reply = {"say": "Hi.", "commands": [{"type": "cmd.hangup"}]}
    s = _sim(hook)
    assert s.kinds() == ["cmd.play_audio:say", "cmd.hangup"]
    assert len(s.log[0][1].pcm) == 1600 and s.log[0][1].rate == 8000
    # A caller turn's words go into the history as what the agent said.
    hook.reply = {"say": "We open at nine."}
    s = _sim(hook)
    s.silence(2000)
    s.said("when do you open")
    assert s.kinds()[-1] == "cmd.play_audio:say"
    assert [m["role"] for m in s.agent.messages()][-2:] == ["user", "assistant"]
    assert s.agent.messages()[-1]["content"] == "We open at nine."


@pytest.mark.parametrize("problem", ["timeout", "trickle", "trickle_headers", "status", "not_json",
                                     "bad_command", "bad_type", "nested", "deeply_nested",
                                     "bad_say"])
def test_failures_fall_back_to_the_default_agent(hook, problem):
    if problem == "timeout":
        hook.delay, hook.reply = 1.0, {"commands": [{"type": "cmd.hangup"}]}
    elif problem == "trickle":  # every byte within any socket timeout, the whole far beyond
        hook.trickle, hook.reply = 0.1, {"commands": [{"type": "cmd.hangup"}]}
    elif problem == "trickle_headers":
        hook.trickle_headers = True
    elif problem == "status":
        hook.status = 500
    elif problem == "not_json":
        hook.reply = b"<html>oops</html>"
    elif problem == "bad_command":
        hook.reply = {"commands": [{"type": "cmd.transfer", "to": []}]}
    elif problem == "bad_type":
        hook.reply = {"commands": [{"type": "audio", "pcm": ""}]}
    elif problem == "nested":  # nests deeper than any real reply: refused before validation
        hook.reply = b'{"commands": ' + b"[" * 40 + b"]" * 40 + b"}"
    elif problem == "deeply_nested":  # Python's own parser would recurse out
        hook.reply = b'{"commands": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    else:
        hook.reply = {"say": {"text": "hi"}}
    t0 = time.monotonic()
    s = _sim(hook)
    assert time.monotonic() - t0 < 0.9  # bounded by the 0.3 s total deadline
    assert s.kinds() == ["cmd.play_audio:greeting"]
    assert s.agent.webhook_failures == 1
    # Transport failures fail the work; a bad reply's content fails in the agent.
    assert s.results[-1].final
    assert s.results[-1].ok == (problem in ("bad_command", "bad_type", "bad_say"))


def test_headers_trickled_forever_cost_only_the_deadline(hook):
    hook.trickle_headers = True
    s = Sim(_settings(PV_AGENT_WEBHOOK_URL=hook.url, PV_AGENT_WEBHOOK_TIMEOUT_S="0.5"), run_works=False)
    t0 = time.monotonic()
    results = run_now("call-1", s.works[0])
    took = time.monotonic() - t0
    assert 0.45 <= took < 0.9, took
    assert [(r.ok, r.final) for r in results] == [(False, True)]
    assert "within 0.5s" in results[0].error


def test_lost_reply_re_asks_with_the_same_event_id(hook):
    hook.reply = {"commands": [{"type": "cmd.speak", "text": "again"}]}
    s = Sim(_settings(PV_AGENT_WEBHOOK_URL=hook.url), run_works=False)
    first = s.works[0]
    state = json.loads(json.dumps(s.agent.to_state()))
    # A takeover: a new agent from the checkpoint, told the work is lost.
    s.agent = WebhookAgent.from_state(s.call, s.settings, state)
    lost = c.WorkDone(call_id="call-1", work_id=first.id, name="webhook", ok=False, error="lost")
    s.event(lost)
    assert len(s.works) == 2 and s.works[1].id == "call-1:w2"
    s.finish(s.works[1])
    assert s.kinds() == ["cmd.speak"]
    assert [e["event_id"] for e in hook.received] == ["call-1:call_started:1"]
    assert s.agent.webhook_failures == 0


def test_dtmf_event_and_hook_transfer_switches_to_monitoring(hook):
    from piopiy_voice.audio import dtmf_tone

    s = _sim(hook)
    s.silence(int(GREETING_S * 1000) + 500)
    hook.reply = {"commands": [{"type": "cmd.transfer", "to": ["919999999999"], "caller_id": "9180"}]}
    s.audio(dtmf_tone("7", ms=100, rate=8000))
    assert hook.received[-1]["event"] == "dtmf" and hook.received[-1]["key"] == "7"
    assert s.kinds()[-1] == "cmd.transfer" and s.agent.mode == "monitoring"
    n_posts = len(hook.received)
    s.silence(20_000)
    assert len(hook.received) == n_posts  # monitoring: no more turns


def test_null_commands_means_default_behaviour(hook):
    hook.reply = {"commands": None}
    s = _sim(hook)
    assert s.kinds() == ["cmd.play_audio:greeting"]


def test_unreachable_webhook_and_noop_fallback():
    class Quiet(WebhookAgent):
        FALLBACK = "noop"

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = _settings(PV_AGENT_WEBHOOK_URL=f"http://127.0.0.1:{port}/none")
    s = Sim(settings, agent_cls=Quiet)
    assert s.kinds() == [] and s.agent.webhook_failures == 1
    assert "unreachable" in s.results[0].error
    s2 = Sim(settings)
    assert s2.kinds() == ["cmd.play_audio:greeting"]


def test_requires_an_http_url():
    call = c.CallStarted(call_id="x", gateway_id="g")
    with pytest.raises(ValueError, match="agent_webhook_url"):
        WebhookAgent(call, _settings())
    with pytest.raises(ValueError, match="http"):
        WebhookAgent(call, _settings(PV_AGENT_WEBHOOK_URL="ftp://x"))


def test_state_survives_a_checkpoint(hook):
    s = _sim(hook)
    hook.reply = {"commands": None}
    s.silence(int(GREETING_S * 1000) + 2500)
    s.event(Tick())
    state = json.loads(json.dumps(s.agent.to_state()))
    again = WebhookAgent.from_state(s.call, s.settings, state)
    assert again.events_sent == s.agent.events_sent and again.reprompts == s.agent.reprompts
    assert again._work_n == s.agent._work_n == len(s.works)


@pytest.mark.integration
def test_worker_runs_the_webhook_agent_end_to_end(hook, r, redis_url):
    from piopiy_voice import keys
    from piopiy_voice.redisconn import connect
    from piopiy_voice.workers.runner import Worker
    from workers_support import FakeGateway, wait_for

    hook.reply = {"commands": [{"type": "cmd.speak", "text": "Welcome"}]}
    settings = _settings(PV_AGENT_WEBHOOK_URL=hook.url, PV_AGENT_WEBHOOK_TIMEOUT_S="2")
    worker = Worker(settings, WebhookAgent, r=connect(redis_url), worker_id="wh", lease_ms=1000)
    t = threading.Thread(target=worker.run, kwargs={"max_seconds": 20}, daemon=True)
    t.start()
    try:
        gw = FakeGateway(r, "call-w")
        gw.start(caller_id="918000000007")
        wait_for(lambda: gw.commands(), what="webhook decision published")
        gw.end("hangup")
        wait_for(lambda: any(e["event"] == "call_ended" for e in hook.received), what="call_ended POST")
    finally:
        worker.stop()
        t.join(10)
    cmds = gw.commands()
    assert [(x.type, x.text) for x in cmds] == [("cmd.speak", "Welcome")]
    assert cmds[0].command_id == "call-w:1"
    first = hook.received[0]
    assert first["event"] == "call_started" and first["params"] == {"caller_id": "918000000007"}
    assert hook.received[-1]["reason"] == "hangup"
    # The reply travelled through the call's own stream, visible to anyone reading it.
    done = [c.decode(f) for _, f in r.xrange(keys.call_stream("call-w")) if f[b"type"] == b"work.done"]
    assert [(d.work_id, d.ok, d.final) for d in done] == [("call-w:w1", True, True)]
