"""WebhookAgent against a stdlib HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from piopiy_voice import contracts as c
from tests.test_workers_agent import GREETING_S, Sim, _settings
from piopiy_voice.workers.agent.default import prompt
from piopiy_voice.workers.agent.webhook import WebhookAgent


class Hook:
    """A webhook whose reply is set per test; records what it was sent."""

    def __init__(self):
        self.received: list[dict] = []
        self.reply: object = {"commands": []}
        self.status = 200
        self.delay = 0.0
        self.trickle = 0.0  # > 0: send the body one byte at a time, this far apart
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers["Content-Length"])
                hook.received.append(json.loads(self.rfile.read(n)))
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
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
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


def _sim(hook, **kw):
    return Sim(agent_cls=WebhookAgent,
               settings=_settings(PV_AGENT_WEBHOOK_URL=hook.url, PV_AGENT_WEBHOOK_TIMEOUT_S="0.3", **kw))


def test_turn_events_posted_and_reply_commands_used(hook):
    hook.reply = {"commands": [{"type": "cmd.speak", "text": "Hi from the hook"}]}
    s = _sim(hook)
    assert s.kinds() == ["cmd.speak"] and s.log[0][1].text == "Hi from the hook"
    assert hook.received[0]["event"] == "call_started" and hook.received[0]["rate"] == 8000
    hook.reply = {"commands": [{"type": "cmd.play_audio", "prompt": "reply"},
                               {"type": "cmd.play_audio", "pcm_b64": base64.b64encode(b"\0\0" * 80).decode()}]}
    s.silence(2000)
    s.speech(900)
    s.silence(500)
    assert s.kinds() == ["cmd.speak", "cmd.play_audio:hook", "cmd.play_audio:hook"]
    turn = hook.received[-1]
    assert turn["event"] == "caller_turn" and turn["turn"] == 1
    assert 700 <= turn["speech_ms"] <= 1300 and "pcm" not in json.dumps(turn)
    assert s.log[1][1].pcm == prompt("reply", 8000)
    assert s.log[2][1].rate == 8000 and len(s.log[2][1].pcm) == 160
    # Barge-in stays local: no POST, still an instant Interrupt.
    n_posts = len(hook.received)
    s.speech(300)
    assert s.kinds()[-1] == "cmd.interrupt" and len(hook.received) == n_posts


def test_dtmf_event_and_hook_transfer_switches_to_monitoring(hook):
    s = _sim(hook)
    s.silence(int(GREETING_S * 1000) + 500)
    hook.reply = {"commands": [{"type": "cmd.transfer", "to": ["919999999999"], "caller_id": "9180"}]}
    s.key("7")
    assert hook.received[-1]["event"] == "dtmf" and hook.received[-1]["key"] == "7"
    assert s.kinds()[-1] == "cmd.transfer" and s.agent.mode == "monitoring"
    n_posts = len(hook.received)
    s.silence(20_000)
    assert len(hook.received) == n_posts  # monitoring: no more turns


def test_null_commands_means_default_behaviour(hook):
    hook.reply = {"commands": None}
    s = _sim(hook)
    assert s.kinds() == ["cmd.play_audio:greeting"]


@pytest.mark.parametrize("problem", ["timeout", "trickle", "status", "not_json", "bad_command",
                                     "bad_type"])
def test_failures_fall_back_to_the_default_agent(hook, problem):
    if problem == "timeout":
        hook.delay, hook.reply = 1.0, {"commands": [{"type": "cmd.hangup"}]}
    elif problem == "trickle":  # every byte within the socket timeout, the whole far beyond
        hook.trickle, hook.reply = 0.1, {"commands": [{"type": "cmd.hangup"}]}
    elif problem == "status":
        hook.status = 500
    elif problem == "not_json":
        hook.reply = b"<html>oops</html>"
    elif problem == "bad_command":
        hook.reply = {"commands": [{"type": "cmd.transfer", "to": []}]}
    else:
        hook.reply = {"commands": [{"type": "audio", "pcm": ""}]}
    t0 = time.monotonic()
    s = _sim(hook)
    assert time.monotonic() - t0 < 0.9  # bounded by the 0.3 s timeout
    assert s.kinds() == ["cmd.play_audio:greeting"]
    assert s.agent.webhook_failures == 1


def test_unreachable_webhook_and_noop_fallback(hook):
    class Quiet(WebhookAgent):
        FALLBACK = "noop"

    settings = _settings(PV_AGENT_WEBHOOK_URL="http://127.0.0.1:9/none", PV_AGENT_WEBHOOK_TIMEOUT_S="0.3")
    s = Sim(agent_cls=Quiet, settings=settings)
    assert s.kinds() == [] and s.agent.webhook_failures == 1
    s2 = Sim(agent_cls=WebhookAgent, settings=settings)
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
    state = json.loads(json.dumps(s.agent.to_state()))
    again = WebhookAgent.from_state(s.call, s.settings, state)
    assert again.events_sent == s.agent.events_sent and again.reprompts == s.agent.reprompts


@pytest.mark.integration
def test_worker_runs_the_webhook_agent_end_to_end(hook, r, redis_url):
    from piopiy_voice.redisconn import connect
    from workers_support import FakeGateway, wait_for
    from piopiy_voice.workers.runner import Worker

    hook.reply = {"commands": [{"type": "cmd.speak", "text": "Welcome"}]}
    settings = _settings(PV_AGENT_WEBHOOK_URL=hook.url)
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
