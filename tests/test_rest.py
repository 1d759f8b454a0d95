"""RestClient against a real HTTP server on 127.0.0.1: bodies, endpoints, errors, retry policy."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from urllib3.exceptions import NewConnectionError, ProtocolError

from piopiy_voice import (
    Action,
    PiopiyApiError,
    PiopiyNetworkError,
    PiopiyValidationError,
    RestClient,
    StreamAction,
)
from piopiy_voice.rest import _never_sent, _retry_after
from piopiy_voice.settings import Settings

OK = {"code": 200, "status": "progress", "request_id": "req-1",
      "data": {"status": "progress", "request_id": "req-1"}}
WS = "ws://127.0.0.1:8765/call/c1?exp=9&sig=aa"
INDIAN_CALLER = 919000000001
GLOBAL_CALLER = 14155550100


class FakePlatform:
    """Records every POST; answers from a script of (status, body, headers) or "hang"."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list = []
        self.release = threading.Event()
        platform = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                platform.requests.append({"path": self.path, "body": json.loads(raw),
                                          "content_type": self.headers.get("Content-Type")})
                step = platform.script.pop(0) if platform.script else (200, OK, {})
                if step == "hang":
                    platform.release.wait(5)
                    return
                status, body, headers = step
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def platform():
    p = FakePlatform()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def client(platform, sleeps):
    c = RestClient(1234, "tok-secret", base_url=platform.url, action_url=platform.url + "/v1/call/action",
                   timeout=(1.0, 0.5), backoff=0.01, max_retries=2, sleep=sleeps.append)
    try:
        yield c
    finally:
        c.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def seed_pcmo() -> StreamAction:
    return StreamAction().stream(WS, {"listen_mode": "callee"}).playMusic("hold.wav").hangup()


# -- bodies and endpoints ----------------------------------------------------------


def test_make_call_exact_body_india(client, platform):
    reply = client.voice.call("919876543210", INDIAN_CALLER, seed_pcmo(),
                              {"duration": 600, "extra_params": {"lead": "42"}})
    assert reply == OK and reply["request_id"] == "req-1"
    (req,) = platform.requests
    assert req["path"] == "/v2/ind_pcmo_make_call"
    assert req["content_type"] == "application/json"
    assert req["body"] == {
        "appid": 1234, "secret": "tok-secret", "from": 919000000001, "to": 919876543210,
        "duration": 600, "extra_params": {"lead": "42"},
        "pcmo": [
            {"action": "stream", "ws_url": WS, "listen_mode": "callee", "voice_quality": 8000,
             "stream_on_answer": True},
            {"action": "play", "file_name": "hold.wav"},
            {"action": "hangup"},
        ],
    }


@pytest.mark.parametrize("caller,path", [
    (INDIAN_CALLER, "/v2/ind_pcmo_make_call"),
    ("+917000000000", "/v2/ind_pcmo_make_call"),
    (GLOBAL_CALLER, "/v2/global_pcmo_make_call"),
    (915123456789, "/v2/global_pcmo_make_call"),      # 91 then 5: not an Indian mobile/landline range
    (9190000000012, "/v2/global_pcmo_make_call"),     # too long for India
])
def test_endpoint_choice(client, platform, caller, path):
    client.voice.call(14155550199, caller, [{"action": "hangup"}])
    assert platform.requests[-1]["path"] == path


def test_defaults_duration_and_extra_params(client, platform):
    client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    body = platform.requests[0]["body"]
    assert body["duration"] == 5400 and body["extra_params"] == {}


def test_pcmo_as_builder_list_or_json_string_send_the_same(client, platform):
    builder = seed_pcmo()
    as_list = builder.actions()
    client.voice.call(919876543210, INDIAN_CALLER, builder)
    assert len(builder) == 3, "voice.call must not empty a StreamAction"
    client.voice.call(919876543210, INDIAN_CALLER, as_list)
    client.voice.call(919876543210, INDIAN_CALLER, builder.PCMO())  # the SDK rejected this string
    client.voice.call(919876543210, INDIAN_CALLER, Action().stream(WS, {"listen_mode": "callee"})
                      .playMusic("hold.wav").hangup())
    bodies = [r["body"]["pcmo"] for r in platform.requests]
    assert bodies[0] == bodies[1] == bodies[2] == bodies[3] == as_list


def test_number_form_builds_bridge_with_loop_and_timeout(client, platform):
    client.voice.call(919876543210, INDIAN_CALLER, "919811112222",
                      {"loop": 2, "timeout": 30, "duration": 900})
    body = platform.requests[0]["body"]
    assert body["duration"] == 900
    assert body["pcmo"] == [{"action": "bridge", "from": 919000000001,
                             "connect": [{"type": "pstn", "number": 919811112222}],
                             "duration": 900, "timeout": 30, "loop": 2}]


@pytest.mark.parametrize("args,field", [
    (("919876543210", INDIAN_CALLER, [{"action": "stream", "ws_url": "http://x.example.com"}]),
     "pcmo[0].ws_url"),
    (("919876543210", INDIAN_CALLER, "[not json"), "pcmo"),
    (("919876543210", INDIAN_CALLER, []), "pcmo"),
    (("919876543210", INDIAN_CALLER, [{"action": "hangup"}], {"loop": 2}), "options.loop"),
    (("919876543210", INDIAN_CALLER, [{"action": "hangup"}], {"retries": 2}), "options.retries"),
    (("919876543210", INDIAN_CALLER, [{"action": "hangup"}], {"duration": 0}), "options.duration"),
    (("919876543210", INDIAN_CALLER, [{"action": "hangup"}], {"extra_params": [1]}),
     "options.extra_params"),
    (("919876543210", INDIAN_CALLER, [{"action": "hangup"}], {"extra_params": {"t": object()}}),
     "options.extra_params"),
    (("0987654321", INDIAN_CALLER, [{"action": "hangup"}]), "to"),
    (("919876543210", "caller", [{"action": "hangup"}]), "piopiy_number"),
    (("919876543210", INDIAN_CALLER, "0123456789"), "pcmo"),
    (("919876543210", INDIAN_CALLER, [{"action": "hangup"}], [("duration", 1)]), "options"),
])
def test_validation_before_sending(client, platform, args, field):
    with pytest.raises(PiopiyValidationError) as e:
        client.voice.call(*args)
    assert e.value.field == field
    assert platform.requests == []


@pytest.mark.parametrize("method,action", [("hangup", "hangup"), ("hold", "hold"),
                                           ("unhold", "unhold"), ("hold_toggle", "holdToggle")])
def test_call_actions(client, platform, method, action):
    assert getattr(client.voice, method)("c-uuid-1") == OK
    (req,) = platform.requests
    assert req["path"] == "/v1/call/action"
    assert req["body"] == {"appid": 1234, "secret": "tok-secret", "cmiuuid": "c-uuid-1", "action": action}


def test_call_action_needs_uuid(client, platform):
    with pytest.raises(PiopiyValidationError) as e:
        client.voice.hangup("  ")
    assert e.value.field == "cmiuuid" and platform.requests == []


# -- API errors ----------------------------------------------------------------------


@pytest.mark.parametrize("code", [420, 422, 404, 502])
def test_error_code_inside_200_reply(client, platform, sleeps, code):
    payload = {"code": code, "message": "nope"}
    platform.script = [(200, payload, {})]
    with pytest.raises(PiopiyApiError) as e:
        client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert (e.value.status, e.value.code, e.value.payload) == (200, code, payload)
    assert "nope" in str(e.value)
    assert len(platform.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_4xx_not_retried(client, platform, sleeps, status):
    platform.script = [(status, {"code": status, "message": "bad"}, {})]
    with pytest.raises(PiopiyApiError) as e:
        client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert e.value.status == status and e.value.code == status
    assert len(platform.requests) == 1 and sleeps == []


@pytest.mark.parametrize("status", [500, 502, 504])
def test_other_5xx_not_retried_for_make_call(client, platform, sleeps, status):
    platform.script = [(status, "upstream exploded", {})]
    with pytest.raises(PiopiyApiError) as e:
        client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert e.value.status == status and e.value.payload == "upstream exploded"
    assert len(platform.requests) == 1 and sleeps == []


def test_5xx_retried_for_idempotent_hangup(client, platform, sleeps):
    platform.script = [(502, "x", {}), (200, OK, {})]
    assert client.voice.hangup("c1") == OK
    assert len(platform.requests) == 2 and sleeps == [0.01]


def test_non_json_200_is_an_api_error(client, platform):
    platform.script = [(200, "<html>ok</html>", {})]
    with pytest.raises(PiopiyApiError) as e:
        client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert e.value.code is None and e.value.payload == "<html>ok</html>"


# -- retry policy ---------------------------------------------------------------------


def test_503_then_200_is_one_call_two_requests(client, platform, sleeps):
    platform.script = [(503, {"code": 503}, {}), (200, OK, {})]
    reply = client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert reply["request_id"] == "req-1"
    assert len(platform.requests) == 2
    assert platform.requests[0]["body"] == platform.requests[1]["body"]
    assert sleeps == [0.01]


def test_429_honours_retry_after(client, platform, sleeps):
    platform.script = [(429, {"code": 429}, {"Retry-After": "2"}), (200, OK, {})]
    assert client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}]) == OK
    assert sleeps == [2.0] and len(platform.requests) == 2


def test_429_retry_after_really_waits(platform):
    platform.script = [(429, {"code": 429}, {"Retry-After": "1"}), (200, OK, {})]
    with RestClient(1, "t", base_url=platform.url, timeout=(1, 2), backoff=0.01) as c:
        start = time.monotonic()
        c.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
        assert time.monotonic() - start >= 0.95
    assert len(platform.requests) == 2


def test_retry_after_too_long_is_not_waited_for(client, platform, sleeps):
    platform.script = [(503, {"code": 503}, {"Retry-After": "120"})]
    with pytest.raises(PiopiyApiError) as e:
        client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert e.value.status == 503 and e.value.retry_after == 120.0
    assert sleeps == [] and len(platform.requests) == 1


def test_503_retries_are_bounded_with_exponential_backoff(client, platform, sleeps):
    platform.script = [(503, {}, {})] * 5
    with pytest.raises(PiopiyApiError) as e:
        client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert e.value.status == 503 and e.value.attempts == 3
    assert len(platform.requests) == 3 and sleeps == [0.01, 0.02]


def test_connection_refused_retried_then_network_error_not_reached(sleeps):
    port = free_port()
    with RestClient(1, "t", base_url=f"http://127.0.0.1:{port}", timeout=(1, 1), backoff=0.01,
                    max_retries=2, sleep=sleeps.append) as c:
        with pytest.raises(PiopiyNetworkError) as e:
            c.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert e.value.reached is False and e.value.attempts == 3
    assert sleeps == [0.01, 0.02]
    assert "did not reach" in str(e.value)


def test_read_timeout_not_retried_for_make_call(client, platform, sleeps):
    platform.script = ["hang"]
    start = time.monotonic()
    with pytest.raises(PiopiyNetworkError) as e:
        client.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}])
    assert e.value.reached is True and e.value.attempts == 1
    assert len(platform.requests) == 1 and sleeps == []
    assert time.monotonic() - start < 3


def test_read_timeout_retried_for_hangup(client, platform, sleeps):
    platform.script = ["hang", (200, OK, {})]
    assert client.voice.hangup("c1") == OK
    assert len(platform.requests) == 2 and sleeps == [0.01]


def test_reached_classification():
    assert _never_sent(requests.exceptions.ConnectTimeout("connect timed out"))
    assert not _never_sent(requests.exceptions.ReadTimeout("read timed out"))
    refused = requests.exceptions.ConnectionError(NewConnectionError(None, "refused"))
    assert _never_sent(refused)
    reset = requests.exceptions.ConnectionError(
        ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")))
    assert not _never_sent(reset)
    assert not _never_sent(requests.exceptions.SSLError("EOF occurred in violation of protocol"))
    assert not _never_sent(requests.exceptions.ConnectionError("unknown"))


def test_retry_after_parsing():
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


# -- construction --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"app_id": "abc"}, "app_id"), ({"app_id": 0}, "app_id"), ({"app_token": ""}, "app_token"),
    ({"base_url": "ftp://x"}, "base_url"), ({"action_url": "127.0.0.1/x"}, "action_url"),
    ({"timeout": (0, 5)}, "timeout"), ({"timeout": "5"}, "timeout"), ({"max_retries": -1}, "max_retries"),
    ({"backoff": -1}, "backoff"),
    # review fix: only a prefix was matched, so trailing junk was accepted
    ({"base_url": "https://rest.telecmi.com bad"}, "base_url"),
    ({"action_url": "http://h/x\n"}, "action_url"),
    ({"max_retry_after": -1}, "max_retry_after"), ({"max_retry_after": "x"}, "max_retry_after"),
])
def test_constructor_validation(kwargs, field):
    args = {"app_id": 1, "app_token": "t", **kwargs}
    with pytest.raises(PiopiyValidationError) as e:
        RestClient(**args)
    assert e.value.field == field


def test_from_settings_and_repr_hides_token():
    s = Settings.from_env({}, PIOPIY_APP_ID="77", PIOPIY_APP_TOKEN="very-secret",
                          PIOPIY_BASE_URL="http://127.0.0.1:9/")
    c = RestClient.from_settings(s)
    assert (c.app_id, c.base_url, c.timeout) == (77, "http://127.0.0.1:9", (3.05, 15.0))
    assert "very-secret" not in repr(c)
    c.close()
    with pytest.raises(PiopiyValidationError):
        RestClient.from_settings(Settings.from_env({}))


def test_connect_timeout_is_retried_then_succeeds(platform, sleeps):
    # A connect timeout cannot be produced reliably on loopback: fail the first
    # attempt in the session, then let the real request through.
    session = requests.Session()
    real_post = session.post
    calls = []

    def flaky_post(*args, **kwargs):
        calls.append(kwargs["timeout"])
        if len(calls) == 1:
            raise requests.exceptions.ConnectTimeout("connect timed out")
        return real_post(*args, **kwargs)

    session.post = flaky_post
    c = RestClient(1, "t", base_url=platform.url, timeout=(0.7, 2.5), backoff=0.01,
                   session=session, sleep=sleeps.append)
    assert c.voice.call(919876543210, INDIAN_CALLER, [{"action": "hangup"}]) == OK
    assert calls == [(0.7, 2.5), (0.7, 2.5)] and sleeps == [0.01]
    assert len(platform.requests) == 1
    c.close()
    session.close()
