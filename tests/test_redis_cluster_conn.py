"""Redis Cluster connections (issue #14): cluster URLs and the clients of
``redisconn`` against a real local cluster.

* ``redis+cluster://`` / ``rediss+cluster://`` URLs: parsed into seed nodes and
  credentials; malformed ones refused in one line that never shows the password;
  ``Settings`` validates REDIS_URL and PV_QUEUE_REDIS_URL (RQ cannot use a cluster).
* Against the session's 3-primary / 3-replica cluster (``redis_cluster``,
  tests/cluster_support.py): ``connect`` / ``connect_async`` / ``connect_once``
  clients route by slot (each key lands on the primary serving it), follow
  MOVED after a slot moved under them, run scripts, refuse cross-slot
  commands; a SIGKILLed primary: a write issued right away succeeds once the
  replica is promoted (sync and asyncio), and what was replicated before is there.
* ``rediss+cluster://``: a TLS-only cluster (client, bus and replication) with
  a CA made by the test.

Skipped without a redis-server binary, unless ``CI`` is set (then it fails).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from redis.crc import key_slot

from piopiy_voice.errors import PiopiyConfigError
from piopiy_voice.redisconn import (
    CLUSTER_RETRY_WINDOW_S, ClusterUnreachableError, ClusterUrl, RedisTls, RedisTlsError, ascript_call,
    async_redis_like, connect, connect_async, connect_once,
    is_cluster_client, is_cluster_url, is_tls_url, parse_cluster_url, redact_url, script_call,
)
from piopiy_voice.settings import Settings

from cluster_support import LocalCluster, cluster_binary  # noqa: E402
from test_redis_tls import _make_leaf, pki  # noqa: F401,E402 (the test certificate authority fixture)

PASSWORD = "pw-never-shown"
#: Longest accepted time from a primary's SIGKILL to a write accepted by its successor
#: (node timeout 1 s: the replica is promoted in about 2-3 s).
FAILOVER_BOUND_S = 15.0


# ------------------------------------------------------- retry decision

def test_retry_window_backs_off_then_raises_one_line(monkeypatch):
    """The one retry decision of the sync and asyncio cluster clients, fed directly."""
    from redis.exceptions import RedisClusterException

    from piopiy_voice import redisconn
    clock = [100.0]
    monkeypatch.setattr(redisconn.time, "monotonic", lambda: clock[0])
    window = redisconn._RetryWindow(1.0)
    delays = [window.delay_after(redis.ConnectionError("refused")) for _ in range(3)]
    assert delays == sorted(delays) and delays[0] > 0 and delays[-1] <= 1.0  # growing backoff
    with pytest.raises(ValueError):  # not transient: raised as it is, at once
        window.delay_after(ValueError("a bug"))
    clock[0] += 0.95  # the next backoff would end past the window
    bare = RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node")
    with pytest.raises(ClusterUnreachableError, match="^Redis Cluster unreachable: ") as info:
        window.delay_after(bare)
    assert info.value.__cause__ is bare
    spent = redisconn._RetryWindow(0.0)
    with pytest.raises(redis.TimeoutError):  # a redis-py error is raised as it is
        spent.delay_after(redis.TimeoutError("slow"))


# ------------------------------------------------------------------ URLs

def test_parse_cluster_url_forms():
    spec = parse_cluster_url(f"redis+cluster://user:{PASSWORD}@10.0.0.1:7000,10.0.0.2:7001/0")
    assert spec == ClusterUrl(nodes=(("10.0.0.1", 7000), ("10.0.0.2", 7001)), username="user",
                              password=PASSWORD, tls=False)
    assert PASSWORD not in repr(spec)
    assert parse_cluster_url("redis+cluster://h").nodes == (("h", 6379),)
    assert parse_cluster_url(f"redis+cluster://:{PASSWORD}@h:1/").password == PASSWORD
    assert parse_cluster_url("redis+cluster://[::1]:7000,h:7000,h:7000").nodes == (("::1", 7000), ("h", 7000))
    tls = parse_cluster_url("rediss+cluster://a:1,b:2")
    assert tls.tls and tls.username is None and tls.password is None
    assert parse_cluster_url("redis+cluster://:p%40ss@a:1").password == "p@ss"


@pytest.mark.parametrize("url, why", [
    ("redis+cluster://", "bad node address"),
    ("redis+cluster://a:1,,b:2", "bad node address"),
    ("redis+cluster://a:0", "bad node address"),
    ("redis+cluster://a:70000", "bad node address"),
    ("redis+cluster://a:x", "bad node address"),
    ("redis+cluster://a:1/2", "only db 0"),
    ("redis+cluster://a:1/0/x", "only db 0"),
    ("redis+cluster://a:1?ssl_cert_reqs=none", "options after"),
    ("redis://a:1", "not a cluster URL"),
])
def test_parse_cluster_url_errors(url, why):
    url = url.replace("://", f"://:{PASSWORD}@", 1)
    with pytest.raises(PiopiyConfigError) as err:
        parse_cluster_url(url)
    message = str(err.value)
    assert why in message and "\n" not in message
    assert PASSWORD not in message
    assert "redis+cluster://[[user]:password@]host1:port1" in message


def test_scheme_predicates_and_redaction():
    assert is_cluster_url("redis+cluster://a:1") and is_cluster_url("REDISS+CLUSTER://a:1")
    assert not is_cluster_url("redis://a:1") and not is_cluster_url(None)
    assert not is_cluster_url("redis+sentinel://a:1/s")
    assert is_tls_url("rediss+cluster://a:1") and not is_tls_url("redis+cluster://a:1")
    assert (redact_url(f"redis+cluster://u:{PASSWORD}@a:1,b:2,c:3/0")
            == "redis+cluster://u:***@a:1,b:2,c:3/0")
    assert redact_url("redis+cluster://a:1,b:2") == "redis+cluster://a:1,b:2"


def test_settings_validate_cluster_and_queue_urls():
    s = Settings.from_env({"REDIS_URL": f"redis+cluster://:{PASSWORD}@a:1,b:2"})
    assert is_cluster_url(s.redis_url)
    with pytest.raises(PiopiyConfigError, match="PV_QUEUE_REDIS_URL"):
        s.queue_url()
    s = Settings.from_env({"REDIS_URL": "redis+cluster://a:1", "PV_QUEUE_REDIS_URL": "redis://q:6379/0"})
    assert s.queue_url() == "redis://q:6379/0"
    assert Settings.from_env({"REDIS_URL": "redis://r:6379/0"}).queue_url() == "redis://r:6379/0"
    for bad, what in (({"REDIS_URL": f"redis+cluster://:{PASSWORD}@a:1,b:x"}, "REDIS_URL"),
                      ({"PV_QUEUE_REDIS_URL": f"redis+cluster://:{PASSWORD}@a:1"}, "PV_QUEUE_REDIS_URL")):
        with pytest.raises(PiopiyConfigError) as err:
            Settings.from_env(bad)
        assert what in str(err.value) and PASSWORD not in str(err.value)


# ------------------------------------------------------- a real cluster


def _keys_on_every_primary(cluster: LocalCluster, n: int = 60) -> list[str]:
    keys = [f"pv:call:{{c{i}}}:meta" for i in range(n)]
    assert len({cluster.primary_port_for(k) for k in keys}) == 3  # they spread over all primaries
    return keys


def _direct(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)


@pytest.mark.integration
def test_connect_routes_each_key_to_its_primary(rc, redis_cluster):
    assert is_cluster_client(rc)
    keys = _keys_on_every_primary(redis_cluster)
    for i, k in enumerate(keys):
        rc.set(k, i)
    for i, k in enumerate(keys):
        node = _direct(redis_cluster.primary_port_for(k))
        try:
            assert node.get(k) == str(i).encode()
        finally:
            node.close()
    # one call's keys share a slot: scripts and transactions over them are allowed
    assert key_slot(b"pv:call:{c1}:meta") == key_slot(b"pv:call:{c1}:in")
    script = rc.register_script("redis.call('set', KEYS[2], ARGV[1]); return redis.call('incr', KEYS[1])")
    assert script(keys=["pv:call:{c1}:n", "pv:call:{c1}:v"], args=["x"]) == 1
    pipe = rc.pipeline(transaction=True)
    pipe.incr("pv:call:{c1}:n").get("pv:call:{c1}:v")
    assert pipe.execute() == [2, b"x"]
    # ... keys of two calls are refused by the client, before anything is sent
    with pytest.raises(redis.RedisClusterException, match="same key slot|same slot"):
        rc.eval("return 1", 2, "pv:call:{c1}:n", "pv:call:{c2}:n")


@pytest.mark.integration
def test_moved_is_followed_after_a_slot_moves(rc, redis_cluster):
    key = "pv:call:{moving}:meta"
    rc.set(key, "before")
    slot = key_slot(key.encode())
    src = redis_cluster.primary_port_for(key)
    dst = next(p for p in redis_cluster.primaries() if p != src)
    aclient = connect_async(redis_cluster.url)

    async def aget():
        return await aclient.get(key)

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(aget()) == b"before"  # its slot map now says src
        assert redis_cluster.move_slot(slot, dst) == src
        assert redis_cluster.primary_port_for(key) == dst
        # both clients still map the slot to src: src answers MOVED, they follow
        assert rc.get(key) == b"before"
        assert rc.set(key, "after")
        assert loop.run_until_complete(aget()) == b"after"
        node = _direct(dst)
        try:
            assert node.get(key) == b"after"
        finally:
            node.close()
    finally:
        loop.run_until_complete(aclient.aclose())
        loop.close()


@pytest.mark.integration
def test_connect_async_and_twin(rc, redis_cluster):
    keys = _keys_on_every_primary(redis_cluster, 30)

    async def main():
        a = connect_async(redis_cluster.url)
        twin = async_redis_like(rc)
        try:
            assert is_cluster_client(a) and is_cluster_client(twin)
            for i, k in enumerate(keys):
                await a.set(k, i)
            assert [int(await twin.get(k)) for k in keys] == list(range(len(keys)))
            script = a.register_script("return redis.call('incr', KEYS[1])")
            assert await script(keys=["pv:call:{s}:n"]) == 1
            # a non-transactional pipeline spans slots: one round trip per node
            pipe = a.pipeline()
            for k in keys:
                pipe.get(k)
            assert [int(v) for v in await pipe.execute()] == list(range(len(keys)))
        finally:
            await a.aclose()
            await twin.aclose()

    asyncio.run(main())


@pytest.mark.integration
def test_connect_once_fails_fast_without_retry(redis_cluster):
    # (the ports 1 and 2 are not listened on: loopback refuses at once)
    once = connect_once(redis_cluster.url, timeout_s=1.0)
    try:
        assert once.ping()
    finally:
        once.close()
    t0 = time.monotonic()
    with pytest.raises(ClusterUnreachableError, match="Redis Cluster unreachable"):
        connect_once("redis+cluster://127.0.0.1:1,127.0.0.1:2", timeout_s=0.5)
    assert time.monotonic() - t0 < 3.0


@pytest.mark.integration
def test_sync_write_rides_out_a_primary_failover(rc, redis_cluster):
    key = "pv:call:{fail1}:meta"
    assert CLUSTER_RETRY_WINDOW_S > FAILOVER_BOUND_S
    rc.set(key, "kept")
    rc.execute_command("WAIT", 1, 2000, target_nodes=rc.get_node_from_key(key))  # on the replica too
    victim = redis_cluster.kill_primary_of(key)
    t0 = time.monotonic()
    assert rc.set("pv:call:{fail1}:after", "1")  # retried until the replica is promoted
    took = time.monotonic() - t0
    print(f"\nsync write after SIGKILL of its primary: {took:.2f} s")
    assert took < FAILOVER_BOUND_S
    assert rc.get(key) == b"kept"
    # The write above reached the promoted replica; the node this asks may still
    # name the dead primary until the failover's news reaches it (gossip).
    deadline = time.monotonic() + 5
    while redis_cluster.primary_port_for(key) == victim:
        assert time.monotonic() < deadline, "the cluster still names the killed primary"
        time.sleep(0.05)
    redis_cluster.wait_healthy()


@pytest.mark.integration
def test_async_write_rides_out_a_primary_failover(rc, redis_cluster):
    key = "pv:call:{fail2}:meta"

    async def main():
        a = connect_async(redis_cluster.url)
        try:
            await a.set(key, "kept")
            await a.execute_command("WAIT", 1, 2000, target_nodes=a.get_node_from_key(key))
            victim = redis_cluster.kill_primary_of(key)
            t0 = time.monotonic()
            assert await a.set("pv:call:{fail2}:after", "1")
            took = time.monotonic() - t0
            print(f"\nasyncio write after SIGKILL of its primary: {took:.2f} s")
            assert took < FAILOVER_BOUND_S
            assert await a.get(key) == b"kept"
            deadline = time.monotonic() + 5  # the asked node may lag the failover (gossip)
            while redis_cluster.primary_port_for(key) == victim:
                assert time.monotonic() < deadline, "the cluster still names the killed primary"
                await asyncio.sleep(0.05)
        finally:
            await a.aclose()

    asyncio.run(main())
    redis_cluster.wait_healthy()


@pytest.mark.integration
def test_heal_brings_a_killed_primary_back_as_a_replica(rc, redis_cluster):
    # (after the failover tests, or on its own: kill one, heal, all six nodes back)
    victim = redis_cluster.kill_primary_of("pv:call:{heal}:meta")
    redis_cluster.wait_healthy()
    redis_cluster.heal()
    roles = dict(redis_cluster.nodes)
    assert len(roles) == 6 and roles[victim] == "replica"
    assert sorted(roles.values()).count("primary") == 3
    assert rc.set("pv:call:{heal}:meta", "ok")


# ------------------------------------------------------------------ TLS

@pytest.mark.integration
def test_rediss_cluster(pki):  # noqa: F811
    if not cluster_binary():
        pytest.skip("no redis-server binary")
    if not (pki / "node.crt").exists():
        # (a node's certificate serves both ways: the cluster bus verifies the caller's)
        _make_leaf(pki, "node", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n")
    cluster = LocalCluster(tls_dir=pki, tls_name="node")
    try:
        assert cluster.url.startswith("rediss+cluster://")
        tls = RedisTls(ca_file=str(pki / "ca.crt"))
        client = connect(cluster.url, tls=tls)
        try:
            keys = _keys_on_every_primary(cluster, 30)
            for i, k in enumerate(keys):
                client.set(k, i)
            assert [int(client.get(k)) for k in keys] == list(range(len(keys)))
        finally:
            client.close()

        async def main():
            a = connect_async(cluster.url, tls=tls)
            try:
                assert await a.get(keys[0]) == b"0"
            finally:
                await a.aclose()

        asyncio.run(main())
        # a CA that did not sign the nodes' certificates: refused, in one line
        with pytest.raises(RedisTlsError) as err:
            connect_once(cluster.url, timeout_s=2.0, tls=RedisTls(ca_file=str(pki / "other-ca.crt")))
        assert "PV_REDIS_TLS_CA_FILE" in str(err.value) and "\n" not in str(err.value)
        assert isinstance(err.value, redis.ConnectionError)
        # a missing CA file: the setting is named
        with pytest.raises(PiopiyConfigError, match="PV_REDIS_TLS_CA_FILE"):
            connect(cluster.url, tls=RedisTls(ca_file=str(pki / "missing.crt")))
    finally:
        cluster.close()


@pytest.mark.integration
def test_scripts_in_cluster_pipelines(rc, redis_cluster):
    # redis-py refuses Script objects in cluster pipelines; script_call queues EVAL instead
    incr = rc.register_script("return redis.call('incrby', KEYS[1], ARGV[1])")
    pipe = rc.pipeline()
    with pytest.raises(redis.RedisClusterException, match="evalsha is blocked"):
        incr(keys=["pv:call:{p}:n"], args=[1], client=pipe)
    pipe = rc.pipeline()
    for i in range(6):
        script_call(incr, [f"pv:call:{{p{i}}}:n"], [i + 1], client=pipe)
    assert pipe.execute() == [1, 2, 3, 4, 5, 6]
    assert script_call(incr, ["pv:call:{p0}:n"], [10]) == 11  # a client: the Script itself
    # after a failover the promoted replica lacks the SCRIPT LOADed script: EVAL does not care
    redis_cluster.kill_primary_of("pv:call:{p0}:n")
    redis_cluster.wait_healthy()
    pipe = rc.pipeline()
    pipe.execute_command("EVALSHA", incr.sha, 1, "pv:call:{p0}:n", 1)
    assert isinstance(pipe.execute(raise_on_error=False)[0], redis.exceptions.NoScriptError)
    pipe = rc.pipeline()
    script_call(incr, ["pv:call:{p0}:n"], [1], client=pipe)
    got = pipe.execute()
    assert got[0] in (12, 1)  # 1 when the write to the old primary had not reached its replica
    assert script_call(incr, ["pv:call:{p0}:n"], [1]) == got[0] + 1

    async def main():
        a = connect_async(redis_cluster.url)
        try:
            aincr = a.register_script("return redis.call('incrby', KEYS[1], ARGV[1])")
            pipe = a.pipeline()
            assert is_cluster_client(pipe)
            for i in range(3):
                await ascript_call(aincr, [f"pv:call:{{q{i}}}:n"], [5], client=pipe)
            assert await pipe.execute() == [5, 5, 5]
            assert await ascript_call(aincr, ["pv:call:{q0}:n"], [1]) == 6
        finally:
            await a.aclose()

    asyncio.run(main())


@pytest.mark.integration
def test_healthcheck_reads_heartbeats_from_a_cluster(rc, redis_cluster, monkeypatch):
    from piopiy_voice import healthcheck
    from piopiy_voice.keys import WORKERS_ZSET

    monkeypatch.setenv("REDIS_URL", redis_cluster.url)
    rc.zadd(WORKERS_ZSET, {"w-cluster-1": time.time()})
    ok, why = healthcheck.check_heartbeat("worker", WORKERS_ZSET, "w-cluster-1", "w-", 5000)
    assert ok, why
    monkeypatch.setenv("REDIS_URL", "redis+cluster://127.0.0.1:1")
    ok, why = healthcheck.check_heartbeat("worker", WORKERS_ZSET, "w-cluster-1", "w-", 5000)
    assert not ok and "unreachable" in why


@pytest.mark.integration
def test_script_call_on_a_single_redis_is_the_script_itself(r, redis_url):
    incr = r.register_script("return redis.call('incrby', KEYS[1], ARGV[1])")
    pipe = r.pipeline()
    script_call(incr, ["pv:call:{s}:n"], [2], client=pipe)
    script_call(incr, ["pv:call:{s}:n"], [3], client=pipe)
    assert pipe.execute() == [2, 5]
    assert script_call(incr, ["pv:call:{s}:n"], [1]) == 6
    assert not is_cluster_client(r) and not is_cluster_client(pipe)

    async def main():
        a = connect_async(redis_url)
        try:
            aincr = a.register_script("return redis.call('incrby', KEYS[1], ARGV[1])")
            apipe = a.pipeline()
            await ascript_call(aincr, ["pv:call:{s}:n"], [1], client=apipe)
            assert await apipe.execute() == [7]
            assert await ascript_call(aincr, ["pv:call:{s}:n"], [1]) == 8
        finally:
            await a.aclose()

    asyncio.run(main())


def test_async_twin_of_a_foreign_cluster_client_is_refused():
    foreign = redis.cluster.RedisCluster.__new__(redis.cluster.RedisCluster)  # (never connected)
    with pytest.raises(PiopiyConfigError, match="async_redis_like"):
        async_redis_like(foreign)


@pytest.mark.integration
def test_rediss_cluster_mutual_tls(pki):  # noqa: F811
    if not cluster_binary():
        pytest.skip("no redis-server binary")
    if not (pki / "node.crt").exists():
        _make_leaf(pki, "node", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n")
    # (the fixture's own admin connections present the node certificate)
    cluster = LocalCluster(primaries=3, replicas=0, tls_dir=pki, tls_name="node",
                           extra_args=["--tls-auth-clients", "yes"],
                           admin_cert=(str(pki / "node.crt"), str(pki / "node.key")))
    try:
        ca = str(pki / "ca.crt")
        client = connect(cluster.url, tls=RedisTls(ca_file=ca, cert_file=str(pki / "client.crt"),
                                                   key_file=str(pki / "client.key")))
        try:
            assert client.set("pv:call:{m}:x", 1) and client.get("pv:call:{m}:x") == b"1"
        finally:
            client.close()
        with pytest.raises(redis.ConnectionError):  # no client certificate: refused
            connect_once(cluster.url, timeout_s=2.0, tls=RedisTls(ca_file=ca))
    finally:
        cluster.close()
