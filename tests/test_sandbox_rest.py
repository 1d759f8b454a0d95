"""Sandbox REST: auth, validation and reply codes over real HTTP on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
import requests

from piopiy_voice.sandbox.platform import PlatformOptions
from piopiy_voice.sandbox.server import Sandbox

APP_ID, TOKEN = "4242", "tok-secret"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    sb = Sandbox(app_id=APP_ID, app_token=TOKEN, report_dir=tmp_path_factory.mktemp("reports"),
                 scenario="hangup_mid_utterance", options=PlatformOptions(ring_ms=50, strict_media=False))
    url = sb.start()
    yield sb, url
    sb.stop()


def body(**over):
    b = {"appid": int(APP_ID), "secret": TOKEN, "from": 919876543210, "to": 14155550100,
         "duration": 60, "extra_params": {}, "pcmo": [{"action": "speak", "text": "hello there"},
                                                      {"action": "hangup"}]}
    b.update(over)
    return {k: v for k, v in b.items() if v is not None}


def post(url, path, payload, **kw):
    return requests.post(url + path, json=payload, timeout=10, **kw)


def test_make_call_success_reply_shape_and_report(sandbox):
    sb, url = sandbox
    r = post(url, "/v2/ind_pcmo_make_call", body())
    assert r.status_code == 200
    reply = r.json()
    rid = reply["request_id"]
    assert reply == {"code": 200, "status": "progress", "request_id": rid,
                     "data": {"status": "progress", "request_id": rid}}
    rep = requests.get(f"{url}/sandbox/calls/{rid}?wait=20", timeout=30).json()
    assert rep["finished"] and rep["end_reason"] == "hangup_pcmo"
    names = [e["event"] for e in rep["events"] if e["src"] == "platform"]
    # speak plays to the end before the hangup action runs.
    assert names.index("play_started") < names.index("play_finished") < names.index("call_ended")
    assert rep["stream"] is None
    for path in rep["recordings"].values():
        assert open(path, "rb").read(4) == b"RIFF"
    assert rid in [c["request_id"] for c in requests.get(url + "/sandbox/calls", timeout=5).json()["calls"]]


def test_global_endpoint_accepts_non_indian_caller_id_ind_refuses_it(sandbox):
    _, url = sandbox
    r = post(url, "/v2/ind_pcmo_make_call", body(**{"from": 14155550199}))
    assert r.status_code == 422 and r.json()["field"] == "from"
    r = post(url, "/v2/global_pcmo_make_call", body(**{"from": 14155550199}))
    assert r.status_code == 200 and r.json()["code"] == 200


@pytest.mark.parametrize("appid,secret", [(9999, TOKEN), (APP_ID, "wrong"), ("4242 ", "tok-secret ")])
def test_bad_auth_is_420(sandbox, appid, secret):
    _, url = sandbox
    r = post(url, "/v2/global_pcmo_make_call", body(appid=appid, secret=secret))
    assert r.status_code == 420
    assert r.json()["code"] == 420 and "authentication" in r.json()["message"]


@pytest.mark.parametrize("missing", ["appid", "secret", "from", "to", "pcmo"])
def test_missing_property_is_422_naming_it(sandbox, missing):
    _, url = sandbox
    b = body()
    del b[missing]
    r = post(url, "/v2/ind_pcmo_make_call", b)
    assert r.status_code == 422
    assert r.json()["code"] == 422 and r.json()["field"] == missing and missing in r.json()["message"]


@pytest.mark.parametrize("pcmo,field", [
    ([{"action": "stream", "ws_url": "ws://127.0.0.1:1/x", "voice_quality": 11025}], "pcmo[0].voice_quality"),
    ([{"action": "speak", "text": "hi"}, {"action": "stream", "ws_url": "http://x/y"}], "pcmo[1].ws_url"),
    ([{"action": "input", "action_url": "http://x/y", "max_digits": 2}], "pcmo[0].max_digits"),
    ([{"action": "dance"}], "pcmo[0].action"),
    ([], "pcmo"),
])
def test_invalid_pcmo_is_422_naming_the_field(sandbox, pcmo, field):
    _, url = sandbox
    r = post(url, "/v2/global_pcmo_make_call", body(pcmo=pcmo))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_unknown_music_file_is_404(sandbox):
    _, url = sandbox
    r = post(url, "/v2/global_pcmo_make_call", body(pcmo=[{"action": "play", "file_name": "no-such-file"}]))
    assert r.status_code == 404 and r.json()["field"] == "pcmo[0].file_name"
    # A plain audio file name is an upload the sandbox does not have: played as synthesized music.
    r = post(url, "/v2/global_pcmo_make_call", body(pcmo=[{"action": "play", "file_name": "hold.wav"}]))
    assert r.status_code == 200


def test_strict_media_knows_only_files_in_media_dirs(tmp_path):
    from piopiy_voice.audio import tone, write_wav

    write_wav(str(tmp_path / "jingle.wav"), tone(440, 300, 8000), 8000)
    opts = PlatformOptions(ring_ms=10, strict_media=True, media_dirs=(tmp_path,))
    with Sandbox(app_id=APP_ID, app_token=TOKEN, report_dir=tmp_path / "r", options=opts,
                 scenario="hangup_mid_utterance") as sb:
        url = sb.base_url
        r = post(url, "/v2/global_pcmo_make_call", body(pcmo=[{"action": "play", "file_name": "other.wav"}]))
        assert r.status_code == 404
        r = post(url, "/v2/global_pcmo_make_call", body(pcmo=[{"action": "play", "file_name": "jingle.wav"}]))
        assert r.status_code == 200
        rep = sb.wait(r.json()["request_id"], 20)
        started = [e for e in rep["events"] if e["event"] == "play_started"]
        assert started[0]["source"].endswith("jingle.wav") and started[0]["ms"] == 300
        assert rep["end_reason"] == "pcmo_completed"


def test_bad_json_duration_extra_params_and_scenario(sandbox):
    _, url = sandbox
    r = requests.post(url + "/v2/global_pcmo_make_call", data=b"{nope", timeout=5,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == 400
    assert post(url, "/v2/global_pcmo_make_call", body(duration=0)).json()["field"] == "duration"
    assert post(url, "/v2/global_pcmo_make_call", body(extra_params=[1])).json()["field"] == "extra_params"
    r = post(url, "/v2/global_pcmo_make_call", body(extra_params={"scenario": "no-such-scenario"}))
    assert r.status_code == 422 and r.json()["field"] == "extra_params.scenario"
    assert requests.get(url + "/nowhere", timeout=5).status_code == 404


def test_injected_fault_then_normal(sandbox):
    _, url = sandbox
    assert post(url, "/sandbox/faults", {"code": 502, "count": 2}).status_code == 200
    assert [post(url, "/v2/global_pcmo_make_call", body()).status_code for _ in range(3)] == [502, 502, 200]


def test_call_action_codes_and_effects(sandbox):
    sb, url = sandbox
    listen = body(pcmo=[{"action": "play", "file_name": "long.wav"}], extra_params={"scenario": "listen"})
    rid = post(url, "/v2/global_pcmo_make_call", listen).json()["request_id"]
    act = {"appid": APP_ID, "secret": TOKEN, "cmiuuid": rid}
    assert post(url, "/v1/call/action", {**act, "action": "hangup", "secret": "x"}).status_code == 420
    assert post(url, "/v1/call/action", {**act, "action": "explode"}).json()["field"] == "action"
    r = post(url, "/v1/call/action", {**act, "cmiuuid": "nope", "action": "hangup"})
    assert r.status_code == 404 and r.json()["field"] == "cmiuuid"
    assert post(url, "/v1/call/action", {**act, "action": "hold"}).json()["code"] == 200
    deadline = time.monotonic() + 5
    while not sb.report(rid)["on_hold"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sb.report(rid)["on_hold"]
    assert post(url, "/v1/call/action", {**act, "action": "holdToggle"}).status_code == 200
    assert post(url, "/v1/call/action", {**act, "action": "hangup"}).status_code == 200
    rep = sb.wait(rid, 10)
    assert rep["end_reason"] == "api_hangup"
    assert [e["event"] for e in rep["events"] if e["event"] in ("held", "unheld")] == ["held", "unheld"]
    # An ended call has no live leg to act on.
    assert post(url, "/v1/call/action", {**act, "action": "hangup"}).status_code == 404


def test_unknown_report_is_404_and_wait_param_checked(sandbox):
    _, url = sandbox
    assert requests.get(url + "/sandbox/calls/abc", timeout=5).status_code == 404
    rid = post(url, "/v2/global_pcmo_make_call", body()).json()["request_id"]
    assert requests.get(f"{url}/sandbox/calls/{rid}?wait=x", timeout=5).status_code == 422


def test_rest_client_against_the_sandbox(sandbox):
    from piopiy_voice import RestClient, StreamAction
    from piopiy_voice.errors import PiopiyApiError

    sb, url = sandbox
    client = RestClient(int(APP_ID), TOKEN, base_url=url, action_url=url + "/v1/call/action", max_retries=0)
    pcmo = StreamAction()
    pcmo.playMusic("hold_music.wav")
    pcmo.hangup()
    reply = client.voice.call(14155550100, 919876543210, pcmo.PCMO(),
                              {"extra_params": {"scenario": "listen"}, "duration": 30})
    rep = sb.wait(reply["request_id"], 20)
    assert rep["endpoint"] == "ind" and rep["end_reason"] == "hangup_pcmo"
    assert [a["action"] for a in rep["pcmo"]] == ["play", "hangup"]
    bad = RestClient(int(APP_ID), "nope", base_url=url, action_url=url + "/v1/call/action", max_retries=0)
    with pytest.raises(PiopiyApiError) as exc:
        bad.voice.call(14155550100, 14155550123, [{"action": "hangup"}])
    assert exc.value.code == 420 and exc.value.status == 420
    with pytest.raises(PiopiyApiError) as exc:
        client.voice.hangup(reply["request_id"])  # already over
    assert exc.value.code == 404


def test_duration_caps_the_call(sandbox):
    sb, url = sandbox
    rid = post(url, "/v2/global_pcmo_make_call",
               body(duration=1, pcmo=[{"action": "play", "file_name": "long.wav"}])).json()["request_id"]
    rep = sb.wait(rid, 10)
    assert rep["end_reason"] == "max_duration"
    ended = next(e for e in rep["events"] if e["event"] == "call_ended")
    assert 950 <= ended["t_ms"] <= 1500
