"""The API role on a Redis Cluster: ``python -m piopiy_voice.api`` with
``REDIS_URL=redis+cluster://...`` (the local cluster) and the dial queue on a
plain Redis (``PV_QUEUE_REDIS_URL``). The answer URL writes inbound records
(the call's slot) and the API's index (its own slot) without a cross-slot
MULTI; the list reads records of calls on every primary; one call's status;
``POST /calls`` queues on the queue Redis; control commands travel through a
gateway command stream (a stand-in gateway thread answers them) and back."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from rq import Queue

from piopiy_voice import callrecord, keys
from piopiy_voice import contracts as c
from piopiy_voice.api import auth
from piopiy_voice.api.inbound import inbound_call_id
from piopiy_voice.redisconn import connect, free_port
from workers_support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ANSWER_TOKEN = "answer-token-cluster"
GATEWAY = "gw-cluster-fake"
QUEUE = "calls-api-cluster"


class FakeGateway:
    """Answers every command on its command stream (on the cluster) with
    ``applied``, like a gateway holding the call would."""

    def __init__(self, url: str) -> None:
        self.r = connect(url)
        self.seen: list[c.Message] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        key, pos = keys.gateway_commands(GATEWAY), "0-0"
        while not self.stop.is_set():
            got = self.r.xread({key: pos}, count=50, block=200)
            for _stream, entries in got or ():
                for entry_id, fields in entries:
                    pos = entry_id
                    cmd = c.decode(fields)
                    self.seen.append(cmd)
                    result = c.CommandResult(call_id=cmd.call_id, command_id=cmd.command_id,
                                             command=cmd.type, status="applied", gateway_id=GATEWAY)
                    self.r.xadd(cmd.reply_to, c.encode(result))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.r.close()


@pytest.fixture
def api(rc, r, redis_cluster, redis_url, subprocess_env, tmp_path):
    port = free_port()
    env = dict(subprocess_env, REDIS_URL=redis_cluster.url, PV_QUEUE_REDIS_URL=redis_url,
               PV_API_PORT=str(port), PV_ANSWER_TOKEN=ANSWER_TOKEN, PV_DIAL_QUEUE=QUEUE,
               PV_SIGNING_SECRET="api-cluster-secret", PV_GATEWAY_PUBLIC_URL="ws://127.0.0.1:9",
               PIOPIY_CALLER_ID="919000000000", PV_API_CONTROL_TIMEOUT_S="5")
    log = open(tmp_path / "api.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "piopiy_voice.api"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    gw = FakeGateway(redis_cluster.url)

    def ready():
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_for(ready, 30, what="the API to answer /healthz")
        _, key = auth.create_key(rc, "read,listen,control,dial", "tests")
        yield type("Api", (), {"base": base, "key": key, "rc": rc, "q": r, "gw": gw,
                               "log": tmp_path / "api.log"})
    finally:
        gw.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def H(key):
    return {"Authorization": f"Bearer {key}"}


def _answer(api, cmiuuid):
    event = {"action": "inbound", "from": "919812345678", "to": "919000000000", "time": "now",
             "cmiuuid": cmiuuid}
    return httpx.post(f"{api.base}/answer?token={ANSWER_TOKEN}", json=event, timeout=10)


def test_inbound_calls_of_many_slots_are_recorded_listed_and_read(api, redis_cluster):
    ids = []
    for i in range(12):
        resp = _answer(api, f"cmi-{i}")
        assert resp.status_code == 200, resp.text
        ids.append(inbound_call_id(f"cmi-{i}"))
    assert len({redis_cluster.primary_port_for(keys.call_meta(cid)) for cid in ids}) >= 2
    for cid in ids:
        wait_for(lambda: api.rc.hget(keys.call_meta(cid), "state") == b"placed", 10, what=f"record of {cid}")
    assert _answer(api, "cmi-0").status_code == 200  # the platform retrying: same call
    assert len(api.rc.xrange(keys.call_timeline(ids[0]))) == 1
    wait_for(lambda: api.rc.zcard(keys.API_CALLS_ZSET) == 12, 10, what="the API's index")

    # one call went live on the fake gateway, another ended (a gateway's writes)
    with api.rc.pipeline() as pipe:
        callrecord.set_state(pipe, ids[1], "live", gateway_id=GATEWAY, rate=8000)
        callrecord.set_state(pipe, ids[2], "ended", end_reason="hangup")
        pipe.execute()
    # and a call nobody indexed, known only from the lifecycle stream
    api.rc.hset(keys.call_meta("c-other"), mapping={"state": "ended", "to": "919800000001"})
    api.rc.xadd(keys.CALLS_STREAM, {"type": "call.ended", "call_id": "c-other"})

    rows = httpx.get(api.base + "/calls", headers=H(api.key), timeout=10).json()["calls"]
    by_id = {row["call_id"]: row for row in rows}
    assert set(ids) | {"c-other"} <= set(by_id)
    assert rows[0]["call_id"] == ids[1] and rows[0]["state"] == "live"
    assert rows[0]["talking"] in ("none", "caller", "agent", "both")
    assert by_id[ids[2]]["state"] == "ended" and by_id[ids[3]]["direction"] == "inbound"
    live = httpx.get(api.base + "/calls?state=live", headers=H(api.key), timeout=10).json()["calls"]
    assert [row["call_id"] for row in live] == [ids[1]]

    one = httpx.get(f"{api.base}/calls/{ids[2]}", headers=H(api.key), timeout=10)
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["record"]["state"] == "ended" and body["record"]["request_id"] == "cmi-2"
    assert [e["event"] for e in body["timeline"]] == ["state.placed", "state.ended"]
    assert httpx.get(f"{api.base}/calls/c-nope", headers=H(api.key), timeout=10).status_code == 404


def test_control_commands_reach_the_gateway_and_answer(api):
    assert _answer(api, "cmi-ctl").status_code == 200
    cid = inbound_call_id("cmi-ctl")
    wait_for(lambda: api.rc.exists(keys.call_meta(cid)), 10, what="the record")
    not_live = httpx.post(f"{api.base}/calls/{cid}/control", headers=H(api.key),
                          json={"action": "pause"}, timeout=10)
    assert not_live.status_code == 409, not_live.text
    with api.rc.pipeline() as pipe:
        callrecord.set_state(pipe, cid, "live", gateway_id=GATEWAY, rate=8000)
        pipe.execute()
    for action in ("pause", "resume", "hangup"):
        resp = httpx.post(f"{api.base}/calls/{cid}/control", headers=H(api.key),
                          json={"action": action}, timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "applied" and resp.json()["gateway_id"] == GATEWAY
    assert [cmd.call_id for cmd in api.gw.seen] == [cid] * 3
    # the private reply streams are gone
    assert not [k for k in api.rc.scan_iter(match=f"{keys.PREFIX}:reply:*")]


def test_post_calls_queues_on_the_queue_redis(api):
    body = {"to": "919812345670", "campaign": "apic"}
    first = httpx.post(api.base + "/calls", headers={**H(api.key), "Idempotency-Key": "order-c1"},
                       json=body, timeout=10)
    assert first.status_code == 201, first.text
    out = first.json()
    again = httpx.post(api.base + "/calls", headers={**H(api.key), "Idempotency-Key": "order-c1"},
                       json=body, timeout=10)
    assert again.status_code == 200 and again.json()["call_id"] == out["call_id"]
    clash = httpx.post(api.base + "/calls", headers={**H(api.key), "Idempotency-Key": "order-c1"},
                       json={**body, "to": "919812345671"}, timeout=10)
    assert clash.status_code == 409
    assert Queue(QUEUE, connection=api.q).count == 1
    assert api.rc.hget(keys.call_meta(out["call_id"]), "state") == b"queued"
    assert api.rc.hget(keys.campaign_key("apic", "states"), out["call_id"]) == b"queued"
    assert not api.q.keys("pv:*")
    rows = httpx.get(api.base + "/calls?state=queued", headers=H(api.key), timeout=10).json()["calls"]
    assert [row["call_id"] for row in rows] == [out["call_id"]]
