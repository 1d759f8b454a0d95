"""The transcriber exports the Redis failures its loop survived, like the worker.

``pv_transcriber_redis_errors_total{kind=...}`` has the worker's kinds
(``unavailable``, ``oom``, ``nogroup``, ``other``). The first test classifies
one error of each kind; the second drives a real loop through a real outage:
a private redis-server stopped (connection refused: ``unavailable``) and
started again EMPTY on the same port (the group is gone: ``nogroup``).
"""

from __future__ import annotations

import threading
import time

import redis

from piopiy_voice import keys
from piopiy_voice.redisconn import EmbeddedRedis, connect
from piopiy_voice.speech.transcriber_metrics import TranscriberMetrics
from piopiy_voice.speech.transcriber_role import Transcriber


class _NoRecognizer:
    """No call is transcribed here: only the loop's Redis handling is exercised."""

    name = "none"

    def stream(self, rate):  # pragma: no cover (never reached: no call is owned)
        raise AssertionError("no call expected")


def _count(text: str, kind: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'pv_transcriber_redis_errors_total{{kind="{kind}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"no redis_errors_total kind={kind} in:\n{text}")


def test_each_kind_of_redis_error_is_exported(r):
    m = TranscriberMetrics()
    t = Transcriber(r, "asr-m1", 1500, _NoRecognizer(), metrics=m)
    assert all(_count(m.render().decode(), k) == 0 for k in ("unavailable", "oom", "nogroup", "other"))
    t.on_redis_error(redis.ConnectionError("Connection refused"))
    t.on_redis_error(redis.TimeoutError("Timeout reading from socket"))
    t.on_redis_error(redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."))
    assert t.on_redis_error(redis.ResponseError("NOGROUP No such key 'pv:calls' or consumer group"))
    t.on_redis_error(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    text = m.render().decode()
    assert _count(text, "unavailable") == 2
    assert _count(text, "oom") == 1
    assert _count(text, "nogroup") == 1
    assert _count(text, "other") == 1
    # The NOGROUP repair really recreated the group.
    assert keys.TRANSCRIBERS_GROUP in {g["name"].decode() for g in r.xinfo_groups(keys.CALLS_STREAM)}


def test_a_real_outage_and_empty_restart_are_counted_and_survived():
    server = EmbeddedRedis()
    port = server.port
    m = TranscriberMetrics()
    t = Transcriber(connect(server.url, socket_timeout=3.0), "asr-m2", 1500, _NoRecognizer(), metrics=m)
    loop = threading.Thread(target=t.run, kwargs={"max_seconds": 40}, daemon=True)
    loop.start()
    try:
        _until(lambda: m.last_turn is not None, "loop turning")
        server.close()  # Redis gone: connection refused
        _until(lambda: _count(m.render().decode(), "unavailable") >= 1, "unavailable counted")
        server = EmbeddedRedis(port=port)  # back, EMPTY: the group is gone
        _until(lambda: _count(m.render().decode(), "nogroup") >= 1, "nogroup counted")
        check = connect(server.url)
        _until(lambda: check.exists(keys.CALLS_STREAM) and keys.TRANSCRIBERS_GROUP in {
            g["name"].decode() for g in check.xinfo_groups(keys.CALLS_STREAM)}, "group recreated")
        turned = m.last_turn
        _until(lambda: m.last_turn != turned, "loop turning again")
        assert loop.is_alive()
        check.close()
    finally:
        t.stop()
        loop.join(10)
        server.close()
    assert not loop.is_alive()


def _until(pred, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
