"""The Redis connection layer and the call record, against a real server."""

import pytest

from piopiy_voice import callrecord, keys
from piopiy_voice.redisconn import MAX_BLOCK_MS, EmbeddedRedis, connect, resolve_redis_url


def test_embedded_server_is_a_real_redis_and_stops_on_close():
    server = EmbeddedRedis()
    client = connect(server.url)
    assert client.ping()
    # Streams and consumer groups (what the system relies on) work.
    client.xadd("s", {"a": "1"})
    client.xgroup_create("s", "g", id="0")
    assert client.xreadgroup("g", "c", {"s": ">"}, count=1)[0][1][0][1] == {b"a": b"1"}
    client.close()
    server.close()
    assert server.proc.poll() is not None


def test_explicit_url_wins(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:1/0")
    assert resolve_redis_url() == "redis://example.invalid:1/0"
    assert resolve_redis_url("redis://other:2/0") == "redis://other:2/0"


def test_socket_timeout_must_exceed_the_longest_block():
    with pytest.raises(ValueError, match="socket_timeout"):
        connect("redis://127.0.0.1:1/0", socket_timeout=MAX_BLOCK_MS / 1000)


def test_call_record_states_and_timeline(r):
    pipe = r.pipeline()
    callrecord.set_state(pipe, "c1", "queued", to="919876543210", campaign="spring")
    callrecord.set_state(pipe, "c1", "placed", request_id="req-1", campaign="spring")
    callrecord.timeline(pipe, "c1", "note", detail={"k": 1})
    pipe.execute()
    record = callrecord.decode_record(r.hgetall(keys.call_meta("c1")))
    assert record["state"] == "placed"
    assert record["request_id"] == "req-1"
    assert "queued_at" in record and "placed_at" in record
    events = [f[b"event"].decode() for _, f in r.xrange(keys.call_timeline("c1"))]
    assert events == ["state.queued", "state.placed", "note"]
    assert r.hget(keys.campaign_key("spring", "states"), "c1") == b"placed"
    assert 0 < r.ttl(keys.campaign_key("spring", "states")) <= keys.CAMPAIGN_TTL_S
    with pytest.raises(ValueError, match="state"):
        callrecord.set_state(r.pipeline(), "c1", "exploded")


def test_expire_call_sets_ttl_on_every_key(r):
    pipe = r.pipeline()
    callrecord.set_state(pipe, "c2", "ended")
    pipe.set(keys.call_lease("c2"), "worker-1")
    callrecord.expire_call(pipe, "c2", ttl_s=100)
    pipe.execute()
    for key in (keys.call_meta("c2"), keys.call_timeline("c2"), keys.call_lease("c2")):
        assert 0 < r.ttl(key) <= 100


def test_async_clients_retry_connection_errors(monkeypatch):
    # They used to be given the sync Retry, which an asyncio client cannot use:
    # a connection error failed the command at once, with no retry at all.
    import asyncio

    import redis
    import redis.asyncio.connection as aioconn

    from piopiy_voice.redisconn import connect_async, free_port

    attempts = 0

    async def refuse(self):
        nonlocal attempts
        attempts += 1
        raise redis.ConnectionError("refused (test)")

    monkeypatch.setattr(aioconn.Connection, "_connect", refuse)
    client = connect_async(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=3.0)
    with pytest.raises(redis.ConnectionError):
        asyncio.run(client.ping())
    assert attempts == 6  # the first try and our 5 retries
