"""Pure parts of the API role: auth (keys, signed URLs), control bodies, the
stereo mixer, slow-listener policy, inbound answer checks, call summaries, and
the OpenAPI document against the app's routes."""

from __future__ import annotations

import asyncio
import json

import fakeredis
import numpy as np
import pytest
from starlette.routing import Route, WebSocketRoute

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.api import auth, calls, control, inbound, listen
from piopiy_voice.api.app import create_app
from piopiy_voice.api.config import ApiSettings
from piopiy_voice.api.openapi import openapi_document
from piopiy_voice.errors import PiopiyConfigError, PiopiyValidationError
from piopiy_voice.settings import Settings
from piopiy_voice.signing import verify_stream_path

SECRET = "unit-test-secret-0123"


# ------------------------------------------------------------------ auth
def test_key_is_stored_hashed_and_revocable():
    r = fakeredis.FakeRedis()
    key_id, key = auth.create_key(r, "read,listen", "alice")
    stored = r.hgetall(keys.API_KEYS_HASH)
    assert list(stored) == [auth.hash_key(key).encode()]
    assert key.encode() not in b"".join(stored.values())
    assert [k["id"] for k in auth.list_keys(r)] == [key_id]
    assert auth.list_keys(r)[0]["scopes"] == ["listen", "read"]
    assert auth.revoke_key(r, key_id) and not auth.revoke_key(r, key_id)
    assert r.hlen(keys.API_KEYS_HASH) == 0


@pytest.mark.parametrize("scopes", ["", "read,admin", "  ,"])
def test_bad_scopes_are_refused(scopes):
    with pytest.raises(ValueError):
        auth.parse_scopes(scopes)


def test_principal_scope_and_call_checks():
    p = auth.Principal(scopes=frozenset({"read"}), key_id="k1")
    p.require("read")
    with pytest.raises(auth.Refusal) as exc:
        p.require("control")
    assert exc.value.status == 403 and "control" in exc.value.reason
    signed = auth.Principal(scopes=frozenset({"listen"}), call_id="c-1")
    signed.require("listen", "c-1")
    with pytest.raises(auth.Refusal) as exc:
        signed.require("listen", "c-2")
    assert exc.value.status == 403


def test_signed_url_round_trip_forgery_and_expiry():
    q = auth.sign_params(SECRET, "listen", "c-1", 60, now=1000)
    assert auth.verify_params(SECRET, "c-1", q, now=1001).scopes == {"listen"}
    cases = [
        ({**q, "sig": "0" * 64}, "bad signature"),
        ({**q, "scope": "control"}, "bad signature"),          # scope is signed
        ({**q, "exp": str(int(q["exp"]) + 100)}, "bad signature"),
        ({k: v for k, v in q.items() if k != "sig"}, "needs"),
    ]
    for query, why in cases:
        with pytest.raises(auth.Refusal) as exc:
            auth.verify_params(SECRET, "c-1", query, now=1001)
        assert exc.value.status == 401 and why in exc.value.reason
    with pytest.raises(auth.Refusal, match="another|bad signature"):
        auth.verify_params(SECRET, "c-2", q, now=1001)          # call id is signed
    with pytest.raises(auth.Refusal, match="expired"):
        auth.verify_params(SECRET, "c-1", q, now=1061)
    with pytest.raises(auth.Refusal):
        auth.verify_params("another-secret-xyz", "c-1", q, now=1001)


def test_refusals_are_counted():
    before = auth.AUTH_REFUSALS.labels(status="401", reason="bad_signature")._value.get()
    with pytest.raises(auth.Refusal):
        auth.verify_params(SECRET, "c-1", {"scope": "listen", "exp": "99", "sig": "x"}, now=0)
    assert auth.AUTH_REFUSALS.labels(status="401", reason="bad_signature")._value.get() == before + 1


def test_bearer_header_parsing():
    assert auth.bearer_token(None) is None
    assert auth.bearer_token("Bearer pvk_x") == "pvk_x"
    for bad in ("Basic abc", "Bearer ", "pvk_x"):
        with pytest.raises(auth.Refusal):
            auth.bearer_token(bad)


# ------------------------------------------------------------------ control bodies
def test_every_cli_control_parses():
    cid = "c-1"
    assert isinstance(control.parse_control({"action": "pause"}, cid), c.Pause)
    assert isinstance(control.parse_control({"action": "resume"}, cid), c.Resume)
    assert isinstance(control.parse_control({"action": "stop"}, cid), c.StopStream)
    assert isinstance(control.parse_control({"action": "interrupt"}, cid), c.Interrupt)
    assert isinstance(control.parse_control({"action": "hangup"}, cid), c.Hangup)
    assert control.parse_control({"action": "play-music", "file": "x.wav"}, cid).file == "x.wav"
    assert control.parse_control({"action": "speak", "text": "hi"}, cid).text == "hi"
    t = control.parse_control({"action": "transfer", "to": "+919000000001"}, cid, default_caller_id="9190")
    assert t.to == ["919000000001"] and t.caller_id == "9190"
    t = control.parse_control({"action": "transfer", "to": "supervisor"}, cid, default_caller_id="9190",
                              supervisor_number="919000000009")
    assert t.to == ["919000000009"]
    p = control.parse_control({"action": "pcmo", "pcmo": [{"action": "hangup"}]}, cid)
    assert p.pcmo == [{"action": "hangup"}] and p.call_id == cid


@pytest.mark.parametrize("body,field", [
    ([], "body"), ("pause", "body"), ({}, "action"), ({"action": "explode"}, "action"),
    ({"action": "pause", "extra": 1}, "extra"), ({"action": "speak"}, "text"),
    ({"action": "speak", "text": ""}, "text"), ({"action": "speak", "text": "x" * 3000}, "text"),
    ({"action": "play_music", "file": 5}, "file"), ({"action": "transfer", "to": "abc"}, "to"),
    ({"action": "transfer", "to": []}, "to"), ({"action": "transfer", "to": "supervisor"}, "to"),
    ({"action": "transfer", "to": "919000000001"}, "caller_id"),
    ({"action": "pcmo", "pcmo": []}, "pcmo"), ({"action": "pcmo", "pcmo": "hangup"}, "pcmo"),
])
def test_malformed_controls_name_the_field(body, field):
    with pytest.raises(PiopiyValidationError) as exc:
        control.parse_control(body, "c-1")
    assert exc.value.field.startswith(field), (exc.value.field, str(exc.value))


# ------------------------------------------------------------------ mixer / listeners
def _pcm(values):
    return np.array(values, dtype="<i2").tobytes()


def test_mixer_puts_inbound_left_and_our_audio_right_and_cuts():
    m = listen.StereoMixer(8000)
    inbound = _pcm([1] * 160)
    assert np.frombuffer(m.frame(inbound), "<i2")[1::2].tolist() == [0] * 160   # nothing to play
    m.add_agent_audio("u1", _pcm([7] * 200), 8000)
    m.add_agent_audio("u2", _pcm([9] * 160), 8000)
    f = np.frombuffer(m.frame(inbound), "<i2")
    assert f[0::2].tolist() == [1] * 160 and f[1::2].tolist() == [7] * 160
    f = np.frombuffer(m.frame(inbound), "<i2")
    assert f[1::2].tolist() == [7] * 40 + [9] * 120                              # in order, no gap
    m.cut("u2")
    assert not m.agent_playing
    m.add_agent_audio("u3", _pcm([5] * 16000), 16000)                            # resampled to the call
    assert m.agent_playing
    m.cut()
    assert not m.agent_playing and np.frombuffer(m.agent_only(), "<i2").tolist() == [0] * 320


class _StuckSocket:
    def __init__(self):
        self.sent = []
        self.block = asyncio.Event()

    async def send_bytes(self, b):
        await self.block.wait()

    async def send_text(self, t):
        await self.block.wait()


def test_slow_listener_skips_oldest_then_is_dropped_when_it_stalls():
    lst = listen.Listener(_StuckSocket(), maxlen=5, max_stall_s=10)
    for i in range(8):
        lst.offer(bytes([i]))
    assert list(lst.queue) == [bytes([i]) for i in range(3, 8)] and lst.skipped_total == 3
    for i in range(500):            # a burst: skips, but it made progress recently
        lst.offer(b"x")
    assert not lst.closed.is_set()
    lst.progress_at -= 11           # nothing sent for longer than max_stall_s
    lst.offer(b"x")
    assert lst.closed.is_set() and lst.close_code == 1008 and "slow" in lst.close_reason


def test_listener_that_never_reads_is_dropped_after_the_send_timeout(monkeypatch):
    monkeypatch.setattr(listen, "SEND_TIMEOUT_S", 0.05)

    async def run():
        lst = listen.Listener(_StuckSocket(), maxlen=5, max_stall_s=100)
        lst.offer(b"frame")
        await asyncio.wait_for(lst.run_writer(), 2)
        return lst
    lst = asyncio.run(run())
    assert lst.closed.is_set() and lst.close_code == 1008 and "not reading" in lst.close_reason


# ------------------------------------------------------------------ inbound
def _api(**kw):
    return ApiSettings(**kw)


def test_answer_url_auth_token_basic_and_allow_list():
    api = _api(answer_token="tok-123456", answer_allow_ips="10.1.0.0/16")
    assert inbound.check_caller(api, "1.2.3.4", "tok-123456", None) == "token"
    import base64
    basic = "Basic " + base64.b64encode(b"1111111:tok-123456").decode()
    assert inbound.check_caller(api, "1.2.3.4", None, basic) == "token"
    assert inbound.check_caller(api, "10.1.2.3", None, None) == "allow_list"
    with pytest.raises(auth.Refusal) as exc:
        inbound.check_caller(api, "1.2.3.4", "wrong", None)
    assert exc.value.status == 403
    with pytest.raises(auth.Refusal) as exc:
        inbound.check_caller(api, "1.2.3.4", None, None)
    assert exc.value.status == 401
    with pytest.raises(auth.Refusal, match="no credentials or allow-list"):
        inbound.check_caller(_api(), "127.0.0.1", "anything", None)


@pytest.mark.parametrize("body,field", [
    (None, "body"), ({"action": "outbound"}, "action"),
    ({"action": "inbound", "from": "x", "to": "919000000000", "cmiuuid": "a"}, "from"),
    ({"action": "inbound", "from": "919812345678", "to": "919000000000", "cmiuuid": "a/b"}, "cmiuuid"),
])
def test_malformed_inbound_events(body, field):
    with pytest.raises(PiopiyValidationError) as exc:
        inbound.parse_inbound(body)
    assert exc.value.field == field


def test_answer_pcmo_streams_to_a_signed_gateway_url_plus_the_flow():
    settings = Settings(PV_SIGNING_SECRET=SECRET, PV_GATEWAY_PUBLIC_URL="wss://gw.example.com")
    api = _api(answer_voice_quality=16000, answer_listen_mode="caller", answer_flow="support",
               answer_extra_actions='[{"action":"speak","text":"bye"},{"action":"hangup"}]')
    cid = inbound.inbound_call_id("uuid-1")
    assert cid == inbound.inbound_call_id("uuid-1") and cid.startswith("in-")
    pcmo = inbound.answer_pcmo(settings, api, cid)
    assert [a["action"] for a in pcmo] == ["stream", "speak", "hangup"]
    stream = pcmo[0]
    assert stream["voice_quality"] == 16000 and stream["listen_mode"] == "caller"
    target = verify_stream_path(stream["ws_url"].removeprefix("wss://gw.example.com"), SECRET)
    assert target.call_id == cid and target.params["flow"] == "support" and target.params["rate"] == "16000"


def test_bad_api_settings_are_config_errors():
    with pytest.raises(PiopiyConfigError):
        ApiSettings.from_env({"PV_ANSWER_ALLOW_IPS": "not-a-net"})
    with pytest.raises(PiopiyConfigError):
        ApiSettings.from_env({"PV_ANSWER_EXTRA_ACTIONS": '[{"action":"stream","ws_url":"ws://x"}]'})


# ------------------------------------------------------------------ calls
def test_summary_and_talking():
    rec = {"state": "live", "live_at": "100.0", "rate": "16000", "listen_mode": "both", "owner": "w1",
           "gateway_id": "g1", "to": "919812345678", "caller_id": "919000000000"}
    row = calls.summarize("c-1", rec, now=112.34, talking="caller")
    assert row == {**row, "state": "live", "rate": 16000, "mode": "both", "owner": "w1", "gateway": "g1",
                   "duration_s": 12.3, "talking": "caller", "direction": "outbound", "from": "919000000000"}
    ended = calls.summarize("c-1", {**rec, "state": "ended", "ended_at": "130"}, now=500, talking="caller")
    assert ended["duration_s"] == 30.0 and ended["talking"] is None
    loud = np.full(160, 8000, dtype="<i2").tobytes()
    quiet = bytes(320)
    now_ms = 10_000
    assert calls.caller_talking([(b"9900-0", {b"type": b"audio", b"pcm": loud})], now_ms)
    assert not calls.caller_talking([(b"9900-0", {b"type": b"audio", b"pcm": quiet})], now_ms)
    assert not calls.caller_talking([(b"5000-0", {b"type": b"audio", b"pcm": loud})], now_ms)
    assert calls.talking_label(True, True) == "both" and calls.talking_label(False, None) == "none"


# ------------------------------------------------------------------ OpenAPI
def test_openapi_lists_exactly_the_app_routes():
    app = create_app(Settings(PV_SIGNING_SECRET=SECRET), ApiSettings(), redis_url="redis://127.0.0.1:1/0")
    routes = set()
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            routes.add((route.path, "get"))
        elif isinstance(route, Route):
            routes.update((route.path, m.lower()) for m in route.methods if m != "HEAD")
    doc = openapi_document()
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented
    ws = doc["paths"]["/calls/{call_id}/listen"]["get"]
    assert ws["x-websocket"] is True
    json.dumps(doc)  # serialisable
