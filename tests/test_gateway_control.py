"""CallHandle and `piopiy-voice control`: reach the gateway holding a call, get its answer."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from piopiy_voice.gateway import control
from piopiy_voice.gateway.control import CallHandle, CallNotFound, CommandTimeout
from piopiy_voice import callrecord, keys
from test_gateway_server import GW, run, running, until, url

pytestmark = pytest.mark.integration


def test_call_handle_round_trip(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            async with connect(url(gw, "call-h"), compression=None) as ws:
                await until(lambda: _live(client), what="live")
                h = CallHandle(r, "call-h", timeout=5)
                steps = [
                    (h.pause, (), {"action": "pause"}),
                    (h.resume, (), {"action": "resume"}),
                    (h.play_music, ("hold.wav",), [{"action": "play", "file_name": "hold.wav"}]),
                    (h.speak, ("hi",), [{"action": "speak", "text": "hi"}]),
                    (h.transfer, ("919000000001", "918000000000"),
                     [{"action": "bridge", "from": 918000000000,
                       "connect": [{"type": "pstn", "number": 919000000001}],
                       "duration": 5400, "timeout": 40, "loop": 1}]),
                    (h.pcmo, ([{"action": "record"}],), [{"action": "record"}]),
                    (h.interrupt, (), {"action": "break"}),
                    (h.stop, (), {"action": "stop"}),
                ]
                for fn, args, expected in steps:
                    res = await asyncio.to_thread(fn, *args)
                    assert (res.status, res.gateway_id) == ("applied", GW), res.reason
                    assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == expected
                bad = await asyncio.to_thread(h.transfer, ["not-a-number"], "1")
                assert bad.status == "rejected" and "digits" in bad.reason
                # Reply streams are cleaned up after each answer.
                assert not [k async for k in client.scan_iter(match="pv:reply:*")]
                rc = await asyncio.to_thread(
                    control.main, ["call-h", "--redis-url", redis_url, "hangup"])
                assert rc == 0
                assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == [{"action": "hangup"}]
    run(scenario())


async def _live(client):
    return (await client.hget(keys.call_meta("call-h"), "state")) == b"live"


def test_unknown_ended_and_unanswered_calls_raise(r, redis_url, capsys):
    with pytest.raises(CallNotFound, match="unknown"):
        CallHandle(r, "nobody").pause()
    p = r.pipeline()
    callrecord.set_state(p, "gone", "ended", gateway_id="gw-x", end_reason="hangup")
    callrecord.set_state(p, "ghost", "live", gateway_id="gw-dead")
    p.execute()
    with pytest.raises(CallNotFound, match="not live: state ended"):
        CallHandle(r, "gone").pause()
    with pytest.raises(CommandTimeout, match="gw-dead"):
        CallHandle(r, "ghost", timeout=0.3).pause()
    assert control.main(["nobody", "--redis-url", redis_url, "pause"]) == 2
    assert "unknown" in capsys.readouterr().err
    with pytest.raises(ValueError, match="call_id"):
        CallHandle(r, "bad id with spaces")
    with pytest.raises(ValueError, match="timeout"):
        CallHandle(r, "x", timeout=0)
