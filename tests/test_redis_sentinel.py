"""Redis Sentinel: a primary failover mid-call is survived (issue #14).

Each test starts its own topology with Debian's ``/usr/bin/redis-server`` on
free loopback ports in a temporary directory: a primary, one replica, and
three sentinels (``redis-server <conf> --sentinel``, quorum 2, the primary
judged down after 1 s), all reached through a ``redis+sentinel://`` URL alone.

* The primary is SIGKILLed and the sentinels promote the replica: the sync
  client of ``connect`` writes again within a bound, and so do RQ on it, the
  asyncio clients (``connect_async``, ``async_redis_like``), and a worker
  process owning a live call keeps serving it with the same agent state.
* The gateway's hand-written writer keeps publishing one call's frames across
  (1) the primary's death, (2) a failover that leaves the old primary running
  (``SENTINEL FAILOVER``), (3) the old primary demoted under it (``READONLY``).
  Every frame is in the new primary except frames the old primary
  acknowledged and never passed on (asynchronous replication; counted,
  printed and bounded); none sent after the writer left the old primary is lost.
* ``rediss+sentinel://``: the same over TLS only (sentinels, data nodes, replication).

Skipped when there is no redis-server binary, unless ``CI`` is set: then it
is a failure (CI installs Debian's redis-server).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from piopiy_voice import keys
from piopiy_voice.errors import PiopiyConfigError
from piopiy_voice.gateway.metrics import Metrics
from piopiy_voice.gateway.publisher import Publisher
from piopiy_voice.redisconn import (
    PRIMARY_CHECK_S, async_redis, async_redis_like, connect, connect_async, connect_once, free_port,
    parse_sentinel_url, redact_url,
)

from test_redis_tls import pki  # noqa: F401,E402 (the test certificate authority fixture)

pytestmark = [pytest.mark.integration]

SERVICE = "pvprimary"
DOWN_AFTER_MS = 1000
#: Longest accepted time from the SIGKILL to a write accepted by the new primary.
FAILOVER_BOUND_S = 20.0
FRAME = b"\x01\x02" * 320  # 20 ms of 16 kHz L16


def _binary() -> str | None:
    for path in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if path and os.path.exists(path):
            return path
    return None


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _ask(port: int, *args: str, call=None, timeout: float = 0.5, ca: str | None = None):
    """One command (or ``call(client)``) to a loopback server, None when it does not answer."""
    tls = dict(ssl=True, ssl_ca_certs=ca) if ca else {}
    client = redis.Redis(port=port, socket_timeout=timeout, socket_connect_timeout=timeout, **tls)
    try:
        return call(client) if call else client.execute_command(*args)
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


def _wait(cond, timeout: float, what: str, topo: "Topology | None" = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out ({timeout}s): {what}" + (topo.logs() if topo else ""))


class Topology:
    """A primary, a replica and three sentinels, private to one test; TLS-only
    (servers, replication, sentinels) when given a directory of test certificates."""

    def __init__(self, pki: Path | None = None) -> None:
        binary = _binary()
        if not binary:
            if os.environ.get("CI"):
                pytest.fail("CI must run the Sentinel tests: no redis-server (install Debian's)")
            pytest.skip("no redis-server binary on this machine")
        self.dir = Path(tempfile.mkdtemp(prefix="pv-sentinel-"))
        self.primary, self.replica, *self.sentinels = _ports(5)
        self.procs: dict[int, subprocess.Popen] = {}
        self.ca = str(pki / "ca.crt") if pki else None
        tls = {} if pki is None else {
            "tls-cert-file": pki / "server.crt", "tls-key-file": pki / "server.key",
            "tls-ca-cert-file": self.ca, "tls-auth-clients": "no", "tls-replication": "yes"}
        try:
            for port, extra in ((self.primary, []),
                                (self.replica, ["--replicaof", "127.0.0.1", str(self.primary)])):
                listen = ["--port", str(port)] if pki is None else ["--port", "0", "--tls-port", str(port)]
                self._start(port, [binary, *listen, "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--repl-diskless-sync-delay", "0",
                                   "--dir", str(self.dir), *extra,
                                   *[a for k, v in tls.items() for a in (f"--{k}", str(v))]])
            self._wait_replicating()
            for port in self.sentinels:
                conf = self.dir / f"sentinel-{port}.conf"
                listen = f"port {port}\n" if pki is None else f"port 0\ntls-port {port}\n"
                conf.write_text(
                    listen + "".join(f"{k} {v}\n" for k, v in tls.items()) +
                    f"bind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {SERVICE} 4000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n")
                self._start(port, [binary, str(conf), "--sentinel"])
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        sentinels = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        self.url = f"{'rediss' if pki else 'redis'}+sentinel://{sentinels}/{SERVICE}/0"

    def _start(self, port: int, argv: list[str]) -> None:
        log = open(self.dir / f"{port}.log", "wb")
        self.procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def _sentinel_view(self, port: int) -> dict:
        return self.ask(port, call=lambda c: c.sentinel_master(SERVICE)) or {}

    def _wait_replicating(self) -> None:
        # Before the sentinels start: they learn of replicas from the primary's
        # INFO, asked at start and then only every 10 s.
        _wait(lambda: all(self.ask(p, "PING") for p in self.procs), 10, "data nodes answer", self)

        def link(client: redis.Redis) -> str:
            return client.info("replication").get("master_link_status")

        _wait(lambda: self.ask(self.replica, call=link) == "up", 10, "replica in sync", self)

    def _wait_ready(self) -> None:
        _wait(lambda: all(self.ask(p, "PING") for p in self.sentinels), 10, "sentinels answer", self)

        def sentinels_agree() -> bool:
            for port in self.sentinels:
                view = self._sentinel_view(port)
                if int(view.get("num-other-sentinels", 0)) != 2 or int(view.get("num-slaves", 0)) != 1:
                    return False
            return True

        # (sentinels find each other through hello messages every 2 s)
        _wait(sentinels_agree, 20, "3 sentinels see each other and the replica", self)

    def ask(self, port: int, *args: str, call=None):
        return _ask(port, *args, call=call, ca=self.ca)

    def primary_named(self) -> set[int]:
        """Ports the sentinels currently name as the primary."""
        named = set()
        for port in self.sentinels:
            addr = self.ask(port, call=lambda c: c.sentinel_get_master_addr_by_name(SERVICE))
            if addr:
                named.add(int(addr[1]))
        return named

    def kill_primary(self) -> float:
        proc = self.procs[self.primary]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        return time.monotonic()

    def logs(self) -> str:
        out = []
        for path in sorted(self.dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-8:]
            out.append(f"\n--- {path.name}\n" + "\n".join(tail))
        return "".join(out)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def topo():
    t = Topology()
    try:
        yield t
    finally:
        t.close()


# ------------------------------------------------------------------ the URL


def test_sentinel_url_is_parsed_and_errors_name_the_problem_not_the_password():
    spec = parse_sentinel_url("rediss+sentinel://app:p%40ss@s1:26380,s2,[::1]:5000/mymaster/3")
    assert spec.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 5000))
    assert (spec.service, spec.db, spec.username, spec.password, spec.tls) == \
        ("mymaster", 3, "app", "p@ss", True)
    assert "p@ss" not in repr(spec)
    assert parse_sentinel_url("redis+sentinel://s1/svc").db == 0
    for url, why in [("redis+sentinel://:pw@s1/", "/<service>"),
                     ("redis+sentinel://:pw@s1/svc/x", "db 'x'"),
                     ("redis+sentinel://:pw@s1:99999/svc", "bad sentinel address"),
                     ("redis+sentinel://:pw@s1,,s2/svc", "bad sentinel address"),
                     ("redis+sentinel://:pw@s1/svc?ssl=1", "not supported"),
                     ("redis+sentinel://:pw@s1/a/1/2", "/<service>")]:
        with pytest.raises(PiopiyConfigError) as err:
            parse_sentinel_url(url)
        assert why in str(err.value) and "pw" not in str(err.value).replace("password", "")
    assert redact_url("redis+sentinel://:pw@s1,s2/svc") == "redis+sentinel://:***@s1,s2/svc"


def test_asyncio_client_from_kwargs_without_an_address_is_refused():
    # A Sentinel client's pool kwargs have no host: never fall back to localhost:6379.
    with pytest.raises(PiopiyConfigError, match="async_redis_like"):
        async_redis(db=0, socket_timeout=5)


# ------------------------------------------------------------- real failover


def _rq_job_runs(conn: redis.Redis) -> None:
    """RQ (the dialer) on the Sentinel client: enqueue, work it (forked horse,
    scheduler on a connection RQ rebuilds from the pool's kwargs), read the result."""
    from rq import Queue, Worker

    q = Queue("pv-sentinel-test", connection=conn)
    job = q.enqueue("builtins.len", "four")
    Worker([q], connection=conn).work(burst=True, with_scheduler=True)
    assert job.return_value(refresh=True) == 4


RATE_FPS = 250  # one call's frames per second
#: Most frames a failover may cost: what the old primary acknowledged in the
#: last moments before it died, or (old primary alive) until the writer saw
#: the sentinels name another node (its check runs every second).
LOSS_BOUND = 3 * RATE_FPS


class _ReconnectSnapshot(Metrics):
    """The writer's metrics, noting how many frames it had published (all of
    them acknowledged by the old primary) when it connects to the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.acked_by_old: int | None = None

    def inc(self, name: str, n: int = 1) -> None:
        if name == "redis_reconnects" and self.c[name] == 1 and self.acked_by_old is None:
            self.acked_by_old = self.c["frames_published"]
        super().inc(name, n)


def _publish_across(topo: Topology, failover, *, primary_check_s: float = 1.0,
                    max_lost: int = LOSS_BOUND) -> dict:
    """One call's audio at ``RATE_FPS`` through the gateway's writer while
    ``failover()`` (a coroutine function) happens; what reached the new primary."""
    call_id = "sentinel-call-1"
    out: dict = {}

    async def run() -> None:
        metrics = _ReconnectSnapshot()
        pub = Publisher(topo.url, linger_s=0.002, connect_timeout=1.0, primary_check_s=primary_check_s,
                        metrics=metrics)
        pub.start()
        prefix = pub.audio_prefix(call_id)
        seq = refused = 0

        async def offer(seconds: float) -> None:
            nonlocal seq, refused
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(RATE_FPS // 50):  # every 20 ms
                    if pub.add_audio(prefix, seq, FRAME):
                        seq += 1
                    else:
                        refused += 1
                await asyncio.sleep(0.02)

        try:
            await offer(0.6)
            assert pub.connected and pub.metrics.c["redis_reconnects"] == 1
            started = time.monotonic()
            producing = asyncio.ensure_future(offer(FAILOVER_BOUND_S))
            await failover()
            # Until the writer is connected to the new primary (by then every reply
            # of the old one had been read: ``acked_by_old`` counts all it acknowledged).
            while metrics.acked_by_old is None and time.monotonic() - started < FAILOVER_BOUND_S:
                await asyncio.sleep(0.01)
            out["switch_s"] = time.monotonic() - started
            out["acked_by_old"] = metrics.acked_by_old
            producing.cancel()
            await offer(0.6)
            assert await pub.flush(10.0), "the writer did not drain after the failover"
            out.update(sent=seq, refused=refused, published=pub.metrics.c["frames_published"])
        finally:
            await pub.close()

    asyncio.run(run())
    assert out["switch_s"] < FAILOVER_BOUND_S, "the writer never reached the new primary" + topo.logs()
    assert topo.primary_named() == {topo.replica}
    new_primary = redis.Redis(port=topo.replica)
    try:
        seqs = [int(fields[b"seq"]) for _, fields in new_primary.xrange(keys.call_stream(call_id))]
    finally:
        new_primary.close()
    present = set(seqs)
    out.update(entries=len(seqs), duplicates=len(seqs) - len(present),
               missing=sorted(set(range(out["sent"])) - present))
    print(f"\nwriter across a failover: {out['sent']} frames sent ({out['refused']} refused), on the new "
          f"primary {out['switch_s']:.2f}s after the failover began, {out['published']} acknowledged, "
          f"{out['entries']} entries there ({out['duplicates']} duplicates), "
          f"{len(out['missing'])} lost (acknowledged by the old primary, of its {out['acked_by_old']}, "
          f"and not replicated)")
    assert out["refused"] == 0
    # Only frames the old primary acknowledged may be lost; everything sent after
    # the writer left it reached the new primary.
    assert all(s < out["acked_by_old"] for s in out["missing"]), out["missing"][-5:]
    assert len(out["missing"]) <= max_lost, f"{len(out['missing'])} frames lost"
    return out


def test_gateway_writer_keeps_publishing_when_the_primary_dies(topo):
    async def kill() -> None:
        topo.kill_primary()

    # Lost at most: what replication lagged behind on loopback (well under 0.5 s).
    _publish_across(topo, kill, max_lost=RATE_FPS // 2)


async def _forced_failover(topo: Topology) -> None:
    """``SENTINEL FAILOVER``: the replica is promoted while the old primary keeps
    running (as a primary, until the sentinels demote it ~10 s later)."""
    assert _ask(topo.sentinels[0], "SENTINEL", "FAILOVER", SERVICE)
    deadline = time.monotonic() + FAILOVER_BOUND_S
    while topo.primary_named() != {topo.replica} and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def test_clients_leave_a_primary_the_sentinels_replaced(topo):
    """The old primary still answers as a primary (for ~10 s, until the sentinels
    demote it): only asking the sentinels tells a client to move, else what it
    writes meanwhile is lost. The writer asks every second while connected; the
    redis-py clients' pools on a checkout at most every second."""
    r = connect(topo.url)
    r.set("sync", "before")  # a pooled connection to the old primary
    landed: dict[str, float] = {}

    async def failover() -> None:
        ar = connect_async(topo.url)
        await ar.set("async", "before")
        asked = time.monotonic()  # (the pools' last question to the sentinels)
        await _forced_failover(topo)
        await asyncio.sleep(max(0.0, PRIMARY_CHECK_S + 0.05 - (time.monotonic() - asked)))
        named = time.monotonic()
        await ar.set("async", "after")
        r.set("sync", "after")
        landed["s"] = time.monotonic() - named
        await ar.aclose()

    _publish_across(topo, failover)
    assert _ask(topo.primary, call=lambda c: c.execute_command("ROLE"))[0] == b"master"  # not yet demoted
    # Both pooled clients wrote to the new primary, not to the old one.
    assert _ask(topo.replica, call=lambda c: c.mget("sync", "async")) == [b"after", b"after"]
    assert _ask(topo.primary, call=lambda c: c.mget("sync", "async")) == [b"before", b"before"]
    assert landed["s"] < 2.0
    r.close()


def test_a_demoted_primary_answering_readonly_makes_the_clients_reconnect(topo, caplog):
    r = connect(topo.url)
    r.set("k", "before")

    async def failover_then_demote() -> None:
        await _forced_failover(topo)
        # What the sentinels do ~10 s later, now: the old primary becomes a replica.
        assert _ask(topo.primary, "REPLICAOF", "127.0.0.1", str(topo.replica))

    with caplog.at_level("WARNING", logger="piopiy_voice.gateway.publisher"):
        _publish_across(topo, failover_then_demote, primary_check_s=0)  # no sentinel checks: READONLY only
    assert "READONLY" in caplog.text
    # The sync client's pooled connection is still to the old primary, and its
    # pool's periodic question is not due: redis-py turns the READONLY into a
    # connection error, and the retry's reconnect asks the sentinels.
    r.connection_pool._checked_at = time.monotonic()
    r.set("k", "after")
    assert _ask(topo.replica, "GET", "k") == b"after"
    r.close()


def test_settings_refuse_a_malformed_sentinel_url_in_one_line():
    from piopiy_voice.settings import Settings

    with pytest.raises(PiopiyConfigError) as err:
        Settings.from_env({"REDIS_URL": "redis+sentinel://:hunter22@s1:26379/"})
    assert "REDIS_URL: redis+sentinel://:***@s1:26379/" in str(err.value) and "hunter22" not in str(err.value)
    assert Settings.from_env({"REDIS_URL": "redis+sentinel://s1/m/1"}).redis_url == "redis+sentinel://s1/m/1"


def test_clients_rq_and_a_worker_carry_on_when_the_primary_dies(topo, subprocess_env):
    from workers_support import FakeGateway, wait_for

    env = dict(subprocess_env, REDIS_URL=topo.url, PV_STALE_COMMAND_MS="0")
    worker = subprocess.Popen(
        [sys.executable, "-m", "piopiy_voice.workers.runner", "--agent", "workers_support:CountingAgent",
         "--worker-id", "w1", "--max-seconds", "55"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(topo.dir / "worker.log", "wb"))
    r = connect(topo.url)
    try:
        r.set("before", "v")
        _rq_job_runs(r)
        once = connect_once(topo.url, timeout_s=3.0)
        assert once.ping()
        # A worker owns a live call and answers every 10th frame.
        wait_for(lambda: r.zscore(keys.WORKERS_ZSET, "w1"), timeout=40, what="worker up")
        gw = FakeGateway(r, "sn-1")
        gw.start()
        r.hset(keys.call_meta("sn-1"), mapping={"state": "live", "gateway_id": "gw1"})

        def texts() -> list[str]:
            return [cmd.text for cmd in gw.commands() if cmd.type == "cmd.speak"]

        for _ in range(30):
            gw.audio(FRAME)
        wait_for(lambda: len(texts()) == 3, what="3 commands before the failover")
        assert r.wait(1, 2000) == 1  # all of it is on the replica too

        killed = topo.kill_primary()
        written, attempts = None, 0
        while time.monotonic() - killed < FAILOVER_BOUND_S:
            attempts += 1
            try:
                r.set("after", "w")  # connect()'s retry rides over most of the outage itself
                written = time.monotonic()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        assert written is not None, "no write accepted after the failover" + topo.logs()
        print(f"\nsentinel failover: SIGKILL -> first write accepted by the new primary in "
              f"{written - killed:.2f}s ({attempts} call(s) of the sync client)")
        assert topo.primary_named() == {topo.replica}
        assert _ask(topo.replica, "GET", "after") == b"w"  # it went to the promoted replica
        assert r.get("before") == b"v"
        _rq_job_runs(r)
        assert once.ping()

        async def asyncio_clients() -> None:
            for client in (connect_async(topo.url),
                           connect_async(topo.url, blocking_pool=True, max_connections=4),
                           async_redis_like(r.connection_pool.connection_kwargs)):
                try:
                    await client.incr("async-writes")
                finally:
                    await client.aclose()

        asyncio.run(asyncio_clients())
        assert _ask(topo.replica, "GET", "async-writes") == b"3"

        # The worker serves its call on: the same agent state (no frame lost or counted twice).
        for _ in range(30):
            gw.audio(FRAME)
        wait_for(lambda: len(texts()) == 6, timeout=FAILOVER_BOUND_S, what="3 commands after the failover")
        print(f"worker across the failover: call served again {time.monotonic() - killed:.2f}s after "
              "the primary died")
        assert [t.split(":")[0] for t in texts()] == ["10", "20", "30", "40", "50", "60"], texts()
        assert worker.poll() is None, "the worker exited after the failover" + topo.logs()
        assert _ask(topo.replica, "GET", keys.call_lease("sn-1")) == b"w1"  # its lease, on the new primary
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(15)
        r.close()


def test_rediss_sentinel_speaks_tls_to_sentinels_and_primary_across_a_failover(pki):
    from piopiy_voice.redisconn import RedisTls

    topo = Topology(pki)
    tls = RedisTls(ca_file=topo.ca)
    try:
        assert topo.url.startswith("rediss+sentinel://")
        r = connect(topo.url, tls=tls)
        r.set("k", "tls")
        assert r.wait(1, 2000) == 1

        async def gateway_and_asyncio_clients(tag: str) -> None:
            pub = Publisher(topo.url, tls=tls, linger_s=0)
            pub.start()
            pub.xadd(f"pv:test:{tag}", {"via": "writer"})
            assert await pub.flush(10.0), pub.last_error
            await pub.close()
            for client in (connect_async(topo.url, tls=tls),
                           async_redis_like(r.connection_pool.connection_kwargs)):
                try:
                    await client.incr(f"async:{tag}")
                finally:
                    await client.aclose()

        asyncio.run(gateway_and_asyncio_clients("before"))
        killed = topo.kill_primary()
        while time.monotonic() - killed < FAILOVER_BOUND_S:
            try:
                r.set("k", "tls-after")
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        asyncio.run(gateway_and_asyncio_clients("after"))
        assert topo.primary_named() == {topo.replica}
        got = topo.ask(topo.replica,
                       call=lambda c: (c.get("k"), c.xlen("pv:test:after"), c.get("async:after")))
        assert got == (b"tls-after", 1, b"2")
        r.close()
    finally:
        topo.close()


def test_gateway_writer_pointed_at_a_replica_keeps_its_frames_and_backs_off(tmp_path, caplog):
    """A plain URL naming a replica (a DNS name not moved yet after a failover):
    every batch answers READONLY. The writer keeps the frames for the primary
    to come and reconnects with a backoff, not in a tight loop."""
    binary = _binary()
    if not binary:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Sentinel tests: no redis-server (install Debian's)")
        pytest.skip("no redis-server binary on this machine")
    port, nowhere = _ports(2)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path),
                             "--replicaof", "127.0.0.1", str(nowhere)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: _ask(port, "PING"), 10, "replica up")

        async def run() -> dict:
            pub = Publisher(f"redis://127.0.0.1:{port}/0", linger_s=0)
            pub.start()
            prefix = pub.audio_prefix("ro-1")
            for seq in range(20):
                pub.add_audio(prefix, seq, FRAME)
            await asyncio.sleep(1.2)
            out = dict(pending=pub.pending_frames, reconnects=pub.metrics.c["redis_reconnects"],
                       published=pub.metrics.c["frames_published"])
            await pub.close(timeout=0.1)
            return out

        with caplog.at_level("WARNING", logger="piopiy_voice.gateway.publisher"):
            got = asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(5)
    print(f"\nwriter on a replica for 1.2 s: {got['reconnects']} connects, {got['pending']} frames kept")
    assert got["pending"] == 20 and got["published"] == 0
    assert "READONLY" in caplog.text
    assert 2 <= got["reconnects"] <= 7  # backoff 0.05, 0.1, 0.2, 0.4, 0.8 s: about 5 in 1.2 s
