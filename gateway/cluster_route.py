"""The gateway's Redis writer on a Redis Cluster: each entry to its slot's primary.

Theory of operation
-------------------
``Publisher(url)`` with a ``redis+cluster://`` (or ``rediss+cluster://``) URL
builds a ``ClusterPublisher``: the same API and the same hand-written RESP as
the single-server writer (``publisher.py``, whose docstring explains why), but
the bytes of each entry go to the primary serving the entry's hash slot.

One buffer, one connection and one flusher task per primary: each primary's
part is the single-server writer (take the whole buffer, one ``write``, one
batch in flight, ``linger``/``batch_min``), and primaries are independent of
each other. A call's keys are all hash-tagged ``{call_id}`` (``keys.py``), so
a call lives in one slot, hence on one primary, and its entries stay in one
ordered byte string as on one server; global keys (``pv:calls``, reply
streams, the suspended set) go where they hash. The audio hot path is the
single-server one plus one dict lookup: call prefix -> its primary (the slot
computed with ``redis.crc.key_slot`` once per call and cached; the cache is
cleared whenever the slot table changes). Measured (``add_audio`` and the
batch take, 10..1000 calls): 0.69-0.84 us a frame against 0.62-0.72 us on a
single server. What does cost is one batch per primary: N primaries, N times
the writes (syscalls, wake-ups) for the same latency, each batch a third as
big. The whole gateway (``bench/gateway_bench.py``, 300 calls, 3 primaries,
on a 2-core machine shared with the cluster's 6 servers) used 1.23-1.30x the
bare receiver's CPU per frame, against 1.04-1.09x on one server; a longer
``linger`` buys it back (2 -> 6 ms: writer CPU 15 -> 11 us a frame in a
writer-only loop) at the price of latency.

The slot -> primary table comes from ``CLUSTER SLOTS``, asked of any
reachable node (the known primaries, then the URL's seeds, then the replicas
seen): at start, every ``refresh_s`` (5 s), soon after a redirect or a
failure, and every ``retry_refresh_s`` (0.2 s) while some slot has no
reachable primary. When the table changes, the entries buffered for a node
that no longer serves their slot are split out of its buffer (parsed back
into commands: the rare path) and put in *front* of their new primary's
buffer: per slot they are older than anything there, so a call's order
holds. Entries for slots nobody serves yet wait aside (``_nowhere``).

Replies that do not mean "written" (rare: a batch's replies are scanned for
errors once; when all succeeded nothing more is done):

* ``MOVED slot host:port``: the slot lives there now. The table entry changes
  at once (and a full refresh is asked for), the node's newer entries of that
  slot move along, and the refused commands go in front of them.
* ``ASK slot host:port`` (a slot being migrated, its key already moved): the
  refused commands are sent once to the target, each behind ``ASKING``,
  ahead of the target's own batch (so ``ASK`` then ``MOVED`` keeps the order).
  Later commands still go to the source first (a key not yet migrated must
  not be created on the target: ``MIGRATE`` would then fail). Refused there
  too, they go back through the slot's owner.
* ``TRYAGAIN`` / ``CLUSTERDOWN`` / ``LOADING`` / ``READONLY`` / ``MASTERDOWN``:
  back in front of their primary's buffer; that node's flusher pauses (from
  50 ms doubling to 250 ms) and a refresh is asked for.

Probing. Redis reads a big batch in pieces (16 KB per read) and updates its
cluster state between reads, so a node whose state turns from down to ok
(the end of a failover) while it works through one batch refuses the
batch's first commands and writes the rest: resent, the refused entries
would land behind newer entries of their calls (seen once in CI: seqs
128-132 of a call behind 133 and up, after a primary kill, while the writer
resent its whole backlog to a refusing node every 50-250 ms). So a node that
refused something is sent one command at a time until one is written; a
written command means the state is ok, and whole batches resume. The turn
the other way (ok to down inside a batch) is harmless: an ok prefix, a
refused suffix resent in order. Cost: one round trip per refusal episode.
Not covered: the very first batch to a node straddling its turn (probing
every new connection was tried: the extra round trip on a call's first
entries at the gateway's start let the call's announcement, ``pv:calls`` on
another node, overtake its record's ``live`` often enough to fail CI).
* anything else (OOM at ``maxmemory``, ``WRONGTYPE``...): rejected and
  counted, as on one server.

A lost connection (a primary killed, a reset, no reply within
``reply_timeout``) puts the node's whole batch back in front of its buffer
(at-least-once: consumers drop duplicates by ``seq``), marks the node down and
asks for a refresh; the flusher reconnects with backoff (50 ms .. 1 s). Until
a replica is promoted (``cluster-node-timeout`` plus an election: about 2-3 s
with a 1 s timeout) the cluster still names the dead node, so its calls'
entries wait, bounded by the limits of an outage of one server
(``buffer_frames``, ``call_frames``, ``max_bytes``; refusals metered by the
caller). When a refresh names the promoted replica the waiting entries move
to it. A node that serves no slot any more is retired (its flusher hands its
work to the current owners and exits). A stopped or cut-off primary answers
nothing and resets nothing: a batch unanswered for ``STALL_S`` (0.5 s) makes
the writer poll the slot map (a node that has a batch stuck is asked last: it
accepts connections and never answers), and when the node is replaced its
flusher is cancelled, the stuck batch going to the new owner, instead of
waiting out ``reply_timeout``. Measured on the local 3+3 cluster
(``cluster-node-timeout`` 1 s): SIGKILL -> writing to the promoted replica
after 2.2-2.9 s, SIGSTOP -> 2.3-3.1 s; nothing lost but what was metered. With ``cluster-require-full-coverage
yes`` (Redis' default) every primary answers ``CLUSTERDOWN`` while a slot is
uncovered, so during a failover *all* calls wait, not only the dead
primary's; ``no`` confines the stall to the dead primary's slots.

What is lost across a primary's death: entries it acknowledged but had not
yet replicated (replication is asynchronous; ``WAIT`` would add a replica round
trip to every batch). The writer cannot see those; consumers see seq gaps.
Everything not acknowledged is resent.

Ordering: a call's entries land in order, across a migration or a failover
too (a node's turn from down to ok inside a batch is kept out by probing,
above). The exception needs two faults at once: a batch that gets no answer
*after* its slot moved away and newer entries were already written at the
new owner (or an ASK resend lost with its connection) lands behind those.
Entries of different slots were never ordered with each other.

``connected`` is true when the topology is known and every primary serving a
slot answered on its connection (a PING at connect, then each batch; an idle
node is PINGed every second). ``flush()`` waits until every entry queued is
acknowledged or rejected. Every key of one command must be in one slot: a
script whose keys span two slots raises ``ValueError`` when queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable, Sequence

import hiredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS as SLOTS
from redis.crc import key_slot

from piopiy_voice.redisconn import RedisTls, parse_cluster_url, ssl_context

from .publisher import IDLE_PING_S, Publisher, append_audio, resp

log = logging.getLogger("piopiy_voice.gateway.publisher")

Addr = tuple[str, int]

#: Error replies after which the command is resent (to the same slot's owner).
RETRY_ERRORS = ("TRYAGAIN", "CLUSTERDOWN", "LOADING", "READONLY", "MASTERDOWN")
_ASKING = resp("ASKING")
_KEYLESS_SLOT = 0
#: A batch unanswered this long (seconds) makes the writer read the slot map
#: again (and every ``retry_refresh_s`` while it stays unanswered).
STALL_S = 0.5
#: Prefix -> slot buffer cache bound (a call's prefix is looked up per frame).
_ROUTE_CACHE = 100_000


# ------------------------------------------------------------ pure helpers
def parse_addr(text: str, default_host: str) -> Addr:
    """``host:port`` (IPv6 hosts keep their colons; an empty host is ``default_host``)."""
    host, _, port = text.rpartition(":")
    return (host or default_host, int(port))


def parse_redirect(message: str, default_host: str) -> tuple[str, int, Addr] | None:
    """("MOVED" | "ASK", slot, address) of a redirect error, else None."""
    parts = message.split(" ")
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    try:
        return parts[0], int(parts[1]), parse_addr(parts[2], default_host)
    except ValueError:
        return None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)


def parse_slots(reply: Any, default_host: str) -> tuple[list[tuple[int, int, Addr]], list[Addr]]:
    """A ``CLUSTER SLOTS`` reply -> ([(first, last, primary)], replicas).
    An empty host means the node we asked; ``?`` (endpoint unknown) skips the
    range (its slots stay without a primary until a later refresh)."""
    ranges: list[tuple[int, int, Addr]] = []
    replicas: list[Addr] = []
    for item in reply or ():
        first, last, primary = int(item[0]), int(item[1]), item[2]
        host = _text(primary[0])
        if host == "?":
            continue
        ranges.append((first, last, (host or default_host, int(primary[1]))))
        for rep in item[3:]:
            rh = _text(rep[0])
            if rh != "?":
                replicas.append((rh or default_host, int(rep[1])))
    return ranges, replicas


def command_slot(args: Sequence[Any]) -> int:
    """The slot a command must be sent to: its key's (``args[1]``), or for a
    script (EVAL/EVALSHA/FCALL) the one slot of all its keys (``ValueError``
    if they span two). Keyless commands go to slot 0."""
    name = _text(args[0]).upper()
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"):
        keys_ = args[3:3 + int(args[2])]
        slots = {key_slot(_key_bytes(k)) for k in keys_}
        if len(slots) > 1:
            raise ValueError(f"{name} keys span {len(slots)} cluster slots: {list(keys_)!r}")
        return slots.pop() if slots else _KEYLESS_SLOT
    if len(args) < 2:
        return _KEYLESS_SLOT
    return key_slot(_key_bytes(args[1]))


def _key_bytes(k: Any) -> bytes:
    if isinstance(k, (bytes, bytearray, memoryview)):
        return bytes(k)
    return str(k).encode()


def split_commands(buf: bytes | bytearray, limit: int | None = None) -> list[tuple[int, int, int]]:
    """Our own RESP commands in ``buf`` (the first ``limit`` of them at most)
    -> (start, end, start of the third argument from the end) of each; that
    last offset ends an audio entry's prefix (``Publisher.audio_prefix``: seq,
    pcm name and pcm follow it)."""
    out: list[tuple[int, int, int]] = []
    pos, size = 0, len(buf)
    while pos < size and (limit is None or len(out) < limit):
        start = pos
        eol = buf.index(b"\r\n", pos)
        argc = int(buf[pos + 1:eol])
        pos = eol + 2
        starts = []
        for _ in range(argc):
            starts.append(pos)
            eol = buf.index(b"\r\n", pos)
            pos = eol + 2 + int(buf[pos + 1:eol]) + 2
        out.append((start, pos, starts[-3] if argc >= 3 else pos))
    return out


def slot_owners(ranges: Iterable[tuple[int, int, Any]]) -> list[Any]:
    """Slot -> owner table (None for slots nobody serves)."""
    table: list[Any] = [None] * SLOTS
    for first, last, owner in ranges:
        table[first:last + 1] = [owner] * (last - first + 1)
    return table


# --------------------------------------------------------------- the writer
class _Node:
    """One primary: its buffer (like the single-server writer's), its
    connection's flusher and the ASK resends waiting for it."""

    __slots__ = ("addr", "buf", "kinds", "per_call", "wake", "task", "connected", "ping_due",
                 "pause", "probe", "retired", "busy", "sent_at", "inflight", "epoch", "asks",
                 "error")

    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self.buf = bytearray()
        #: one byte per command in ``buf``: 1 audio, 0 anything else
        self.kinds = bytearray()
        #: audio prefix -> that call's frames in ``buf`` (``call_frames`` bound)
        self.per_call: dict[bytes, int] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.connected = False
        self.ping_due = False
        #: seconds to wait before the next batch (after TRYAGAIN/CLUSTERDOWN)
        self.pause = 0.0
        #: send one command at a time until one is written (module docstring:
        #: probing): set after a refusal
        self.probe = False
        self.retired = False
        #: a batch is out (awaiting replies), since ``sent_at`` (monotonic)
        self.busy = False
        self.sent_at = 0.0
        #: (commands, audio frames) of the batch out
        self.inflight = (0, 0)
        #: the slot table's epoch when the batch out was taken
        self.epoch = 0
        #: (command bytes, kind) to send behind ASKING, in order
        self.asks: list[tuple[bytes, int]] = []
        self.error = ""


class ClusterPublisher(Publisher):
    """``Publisher`` for a Redis Cluster (see the module docstring)."""

    refresh_s = 5.0
    retry_refresh_s = 0.2
    max_backoff_s = 1.0
    #: Longest pause of a node's flusher after TRYAGAIN/CLUSTERDOWN (answered at
    #: once, so cheap to ask again; longer would delay the recovery).
    max_pause_s = 0.25
    #: How long one node gets to answer CLUSTER SLOTS before the next is asked.
    topology_timeout = 1.0

    def _address(self, url: str, tls: RedisTls | None, connect_timeout: float) -> None:
        spec = parse_cluster_url(url)
        self._ssl = ssl_context(tls if tls is not None else RedisTls.from_env()) if spec.tls else None
        self._seeds: list[Addr] = [(h, int(p)) for h, p in spec.nodes]
        self._auth = (spec.username, spec.password)
        self._db = 0
        self._addr = None, "", 0
        #: slot -> the primary serving it (None: unknown)
        self._owner: list[_Node | None] = [None] * SLOTS
        #: bumped whenever ``_owner`` changes (a batch taken before is rerouted if it comes back)
        self._epoch = 0
        self._nodes: dict[Addr, _Node] = {}
        self._serving_set: set[_Node] = set()
        self._replicas: list[Addr] = []
        #: entries whose slot has no known primary yet (never flushed; rerouted by ``_apply``)
        self._nowhere = _Node(("", 0))
        #: audio prefix -> the node its call's slot is on (cleared when ``_owner`` changes)
        self._route: dict[bytes, _Node] = {}
        self._topology_ok = False
        self._refresh = asyncio.Event()
        self._last_refresh = 0.0
        #: every node flusher still running
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ producers
    def _route_prefix(self, prefix: bytes) -> _Node:
        # The key is the prefix's second argument: *N $4 XADD $<len> <key>
        klen_start = prefix.index(b"XADD\r\n") + 6
        eol = prefix.index(b"\r\n", klen_start)
        klen = int(prefix[klen_start + 1:eol])
        node = self._owner[key_slot(prefix[eol + 2:eol + 2 + klen])] or self._nowhere
        if len(self._route) >= _ROUTE_CACHE:
            self._route.clear()
        self._route[prefix] = node
        return node

    def add_audio(self, prefix: bytes, seq: int, pcm: bytes) -> bool:
        # The single-server ``add_audio`` plus one dict lookup: the buffer is the node's.
        if self.frames >= self.limit:
            return False
        node = self._route.get(prefix) or self._route_prefix(prefix)
        per_call = node.per_call
        n = per_call.get(prefix, 0)
        if n >= self.call_limit:
            return False
        per_call[prefix] = n + 1
        node.kinds.append(1)
        append_audio(node.buf, prefix, seq, pcm)
        self.frames += 1
        if not node.wake.is_set():
            node.wake.set()
        return True

    def room_for(self, prefix: bytes) -> bool:
        node = self._route.get(prefix) or self._route_prefix(prefix)
        return self.frames < self.limit and node.per_call.get(prefix, 0) < self.call_limit

    def command(self, *args: Any) -> None:
        """Queue any one-slot Redis command (never refused)."""
        node = self._owner[command_slot(args)] or self._nowhere
        node.buf += resp(*args)
        node.kinds.append(0)
        if node is self._nowhere:
            self._refresh.set()
        elif not node.wake.is_set():
            node.wake.set()

    def _all_nodes(self) -> list[_Node]:
        return [*self._nodes.values(), self._nowhere]

    @property
    def pending_frames(self) -> int:
        return self.frames + sum(n.inflight[1] for n in self._nodes.values())

    @property
    def _pending(self) -> int:
        """Commands not yet acknowledged (buffered, out, or waiting to be resent behind ASKING)."""
        return sum(len(n.kinds) + n.inflight[0] + len(n.asks) for n in self._all_nodes())

    @property
    def has_room(self) -> bool:
        return sum(len(n.buf) for n in self._all_nodes()) < self.max_bytes

    @property
    def connected(self) -> bool:  # type: ignore[override]
        return self._topology_ok and all(n.connected for n in self._serving_set)

    @connected.setter
    def connected(self, value: bool) -> None:
        pass  # derived from the nodes (Publisher.__init__ assigns it)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(
                self._manage(), name="publisher-cluster")

    async def flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._pending:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def close(self, timeout: float = 5.0) -> None:
        await self.flush(timeout)
        self._closing = True
        tasks = list(self._tasks)  # retired nodes' flushers may still be finishing
        if self._supervisor is not None:
            tasks.append(self._supervisor)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lost = self._pending
        lost_frames = self.frames + sum(k for n in self._all_nodes() for _c, k in n.asks)
        if lost:
            self.metrics.inc("frames_dropped_closing", lost_frames)
            log.warning("redis writer closing: discarding %d unwritten entries (%d audio frames)",
                        lost, lost_frames)
        for node in self._all_nodes():
            node.buf, node.kinds, node.per_call, node.asks = bytearray(), bytearray(), {}, []
            node.connected = False
        self.frames = 0

    # ------------------------------------------------------------- topology
    def _node(self, addr: Addr) -> _Node:
        node = self._nodes.get(addr)
        if node is None:
            node = self._nodes[addr] = _Node(addr)
            if self._supervisor is not None and not self._closing:
                node.task = asyncio.get_running_loop().create_task(
                    self._node_supervise(node), name=f"publisher-{addr[0]}:{addr[1]}")
                self._tasks.add(node.task)
                node.task.add_done_callback(self._tasks.discard)
        return node

    async def _manage(self) -> None:
        """Keep the slot table current; it starts and retires the node flushers."""
        while not self._closing:
            healthy = False
            try:
                await self._refresh_topology()
                healthy = not self._nowhere.kinds and self.connected and not self._stalled()
            except Exception as exc:  # noqa: BLE001 (no node answered: keep trying)
                self.last_error = f"cluster topology: {exc!r}"
                self.metrics.inc("redis_errors")
                self._log_error(f"redis writer cannot read the cluster's slots ({exc!r}); "
                                f"{self.frames} frames buffered")
            due = time.monotonic() + (self.refresh_s if healthy else self.retry_refresh_s)
            # Until the next refresh is due (or asked for), look every STALL_S for
            # a batch that has waited that long: a stopped or cut-off primary
            # answers nothing, no error tells us, its replica may be promoted.
            while (left := due - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._refresh.wait(), min(left, STALL_S))
                    break
                except asyncio.TimeoutError:
                    if healthy and self._stalled():
                        break
            self._refresh.clear()
            # A burst of redirects asks once; at most one refresh per 50 ms.
            gap = self._last_refresh + 0.05 - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)

    def _stalled(self) -> bool:
        """Some batch has waited STALL_S for its replies."""
        old = time.monotonic() - STALL_S
        return any(n.busy and n.sent_at < old for n in self._serving_set)

    async def _refresh_topology(self) -> None:
        self._last_refresh = time.monotonic()
        # Healthy primaries first: a stopped node accepts TCP connections and never answers.
        stale = time.monotonic() - STALL_S
        candidates = [n.addr for n in sorted(
            self._serving_set, key=lambda n: (not n.connected, n.busy and n.sent_at < stale))]
        for a in self._seeds + self._replicas + list(self._nodes):
            if a not in candidates:
                candidates.append(a)
        last: Exception | None = None
        for addr in candidates:
            try:
                reply = await self._ask_slots(addr)
            except Exception as exc:  # noqa: BLE001 (next candidate)
                last = exc
                continue
            ranges, replicas = parse_slots(reply, addr[0])
            if not ranges:
                last = ConnectionError(f"{addr[0]}:{addr[1]} knows no slots")
                continue
            self.metrics.inc("redis_topology")
            self._replicas = replicas
            self._apply(ranges)
            return
        raise last or ConnectionError("no cluster node known")

    async def _ask_slots(self, addr: Addr) -> Any:
        """``CLUSTER SLOTS`` of one node, on a connection of its own."""
        reply, writer = await asyncio.wait_for(
            self._open(addr, extra=[resp("CLUSTER", "SLOTS")]), self.topology_timeout)
        writer.close()
        return reply

    def _apply(self, ranges: list[tuple[int, int, Addr]]) -> None:
        """A new slot table: move buffered entries to their slots' primaries,
        start flushers for new primaries, retire those serving nothing."""
        table = slot_owners((first, last, self._node(addr)) for first, last, addr in ranges)
        self._topology_ok = True
        if table != self._owner:
            self._set_owners(table)
            for node in self._all_nodes():
                self._reroute(node)
        for node in list(self._nodes.values()):
            if node not in self._serving_set and not node.asks:
                node.retired = True
                node.wake.set()
                del self._nodes[node.addr]
                if node.busy and node.task is not None:
                    # Its batch may wait for ``reply_timeout`` on a dead or cut-off
                    # node: stop waiting, the batch goes to the slots' new owners.
                    node.task.cancel()

    def _set_owners(self, table: list[_Node | None]) -> None:
        self._owner = table
        self._serving_set = {n for n in table if n is not None}
        self._epoch += 1
        self._route.clear()

    def _reroute(self, node: _Node) -> None:
        """Entries in ``node``'s buffer whose slot another primary serves now go
        to the front of that primary's buffer (rare: a topology change).
        Per slot, their order is kept, and they are older than anything of
        their slot already buffered there (routing changed just now)."""
        if not node.kinds:
            return
        owner = self._owner
        buf, kinds = node.buf, node.kinds
        moves: dict[_Node, list[tuple[bytes, int]]] = {}
        stay: list[tuple[bytes, int]] = []
        for i, (start, end, _) in enumerate(split_commands(buf)):
            cmd = bytes(buf[start:end])
            target = owner[_slot_of(cmd)] or self._nowhere
            if target is node:
                stay.append((cmd, kinds[i]))
            else:
                moves.setdefault(target, []).append((cmd, kinds[i]))
        if not moves:
            return
        node.buf, node.kinds, node.per_call = bytearray(), bytearray(), {}
        self.frames -= sum(kinds)
        self._prepend(node, stay)
        for target, cmds in moves.items():
            self._prepend(target, cmds)

    def _prepend(self, node: _Node, cmds: list[tuple[bytes, int]]) -> None:
        """Commands back in front of ``node``'s buffer, in their order."""
        if not cmds:
            return
        per_call = node.per_call
        for cmd, kind in cmds:
            if kind:
                prefix = cmd[:split_commands(cmd)[0][2]]
                per_call[prefix] = per_call.get(prefix, 0) + 1
        node.buf[:0] = b"".join(c for c, _ in cmds)
        node.kinds[:0] = bytes(k for _, k in cmds)
        self.frames += sum(k for _, k in cmds)
        if node is self._nowhere:
            self._refresh.set()
        else:
            node.wake.set()

    # -------------------------------------------------------------- flusher
    async def _open(self, addr: Addr, extra: list[bytes] | None = None) -> tuple[Any, Any]:
        """Connect (TLS, AUTH) and PING: (reader, writer); with ``extra``
        commands, (the last one's reply, writer)."""
        reader, writer, replies = await self._greet(*addr, [resp("PING"), *(extra or [])])
        if extra:
            return replies[-1], writer
        return reader, writer

    async def _node_supervise(self, node: _Node) -> None:
        backoff = 0.05
        while not node.retired and not self._closing:
            try:
                await self._node_run(node)
                return
            except asyncio.CancelledError:
                if node.retired and not self._closing:
                    # Retired while a batch was out (``_apply``): that batch was put
                    # back and rerouted; what else waited here goes along.
                    asks, node.asks = node.asks, []
                    self._requeue_commands(asks)
                    self._reroute(node)
                    return
                raise
            except Exception as exc:  # noqa: BLE001 (the writer must never stay dead)
                node.connected = False
                self.last_error = f"writer died: {exc!r}"
                self.metrics.inc("writer_restarts")
                log.exception("redis writer for %s:%d died; restarting in %.2fs",
                              *node.addr, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _ping_due(self, node: _Node) -> None:
        node.ping_due = True
        node.wake.set()

    async def _node_run(self, node: _Node) -> None:
        backoff = 0.05
        reader = writer = None
        loop = asyncio.get_running_loop()
        node.wake.set()  # connect now: ``connected`` must not wait for the first entry
        try:
            while True:
                if not node.wake.is_set():
                    ping = loop.call_later(IDLE_PING_S, self._ping_due, node)
                    await node.wake.wait()
                    ping.cancel()
                if node.retired:
                    # Nothing of ours is routed here any more; ASK resends go back.
                    asks, node.asks = node.asks, []
                    self._requeue_commands(asks)
                    self._reroute(node)
                    return
                if writer is None:
                    try:
                        reader, writer = await self._open(node.addr)
                    except Exception as exc:  # noqa: BLE001 (uvloop: RuntimeError too)
                        self._node_failed(node, f"cannot connect to {node.addr[0]}:{node.addr[1]}: "
                                                f"{exc!r}")
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, self.max_backoff_s)
                        node.wake.set()
                        continue
                    if not node.connected:
                        self.metrics.inc("redis_reconnects")
                        log.info("redis writer connected to %s:%d", *node.addr)
                    node.connected = True
                    node.error = ""
                    backoff = 0.05
                    if self.connected:
                        self.last_error = ""
                if node.pause:
                    await asyncio.sleep(node.pause)
                if self.linger and len(node.kinds) < self.batch_min:
                    await asyncio.sleep(self.linger)
                batch, kinds, per_call, frames = self._take(node)
                asks, node.asks = node.asks, []
                node.wake.clear()
                ping, node.ping_due = node.ping_due, False
                if not kinds and not asks and not ping:
                    continue
                node.busy, node.epoch, node.sent_at = True, self._epoch, time.monotonic()
                node.inflight = (len(kinds), frames)
                try:
                    ok = await self._send(node, reader, writer, asks, batch, kinds, per_call, frames,
                                          ping)
                except BaseException as exc:
                    # No (complete) answer: everything back in front, resent after reconnecting.
                    self._put_back(node, asks, batch, kinds, per_call, frames)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    self._node_failed(node, f"connection to {node.addr[0]}:{node.addr[1]} lost: "
                                            f"{exc!r}")
                    writer.close()
                    reader = writer = None
                    node.wake.set()
                    continue
                finally:
                    node.busy = False
                    node.inflight = (0, 0)
                node.pause = 0.0 if ok else min(max(node.pause * 2, 0.05), self.max_pause_s)
                if kinds or asks:
                    node.probe = not ok
        finally:
            if writer is not None:
                writer.close()

    def _take(self, node: _Node) -> tuple[bytearray, bytearray, dict[bytes, int], int]:
        """Empty the node's buffer into a batch (as the single-server writer
        does); only its first command while the node is probing."""
        if node.probe and len(node.kinds) > 1:
            return self._take_first(node)
        batch, kinds, per_call = node.buf, node.kinds, node.per_call
        node.buf, node.kinds, node.per_call = bytearray(), bytearray(), {}
        frames = sum(per_call.values())
        self.frames -= frames
        return batch, kinds, per_call, frames

    def _take_first(self, node: _Node) -> tuple[bytearray, bytearray, dict[bytes, int], int]:
        """The first command of the node's buffer as a batch of one (probing)."""
        start, end, prefix_end = split_commands(node.buf, limit=1)[0]
        batch = node.buf[start:end]
        del node.buf[:end]
        kind = node.kinds[0]
        del node.kinds[:1]
        per_call: dict[bytes, int] = {}
        if kind:
            prefix = bytes(batch[:prefix_end])
            left = node.per_call[prefix] - 1
            if left:
                node.per_call[prefix] = left
            else:
                del node.per_call[prefix]
            per_call[prefix] = 1
            self.frames -= 1
        return batch, bytearray((kind,)), per_call, kind

    def _node_failed(self, node: _Node, why: str) -> None:
        node.connected = False
        node.error = why
        self.last_error = why
        self.metrics.inc("redis_errors")
        self._log_error(f"redis writer: {why}; {self.frames} frames buffered")
        self._refresh.set()

    def _put_back(self, node: _Node, asks: list[tuple[bytes, int]], batch: bytearray,
                  kinds: bytearray, per_call: dict[bytes, int], frames: int) -> None:
        node.buf[:0] = batch
        node.kinds[:0] = kinds
        for k, v in per_call.items():
            node.per_call[k] = node.per_call.get(k, 0) + v
        self.frames += frames
        if node.epoch != self._epoch or node.retired:
            self._reroute(node)  # the slot table changed while the batch was out
        self._requeue_commands(asks)

    def _requeue_commands(self, cmds: list[tuple[bytes, int]]) -> None:
        """Commands back in front of their slots' current primaries' buffers, in order."""
        by_node: dict[_Node, list[tuple[bytes, int]]] = {}
        for cmd, kind in cmds:
            target = self._owner[_slot_of(cmd)] or self._nowhere
            by_node.setdefault(target, []).append((cmd, kind))
        for target, items in by_node.items():
            self._prepend(target, items)

    async def _send(self, node: _Node, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    asks: list[tuple[bytes, int]], batch: bytearray, kinds: bytearray,
                    per_call: dict[bytes, int], frames: int, ping: bool) -> bool:
        """Write one batch to ``node`` (ASK resends first, each behind ASKING)
        and account for its replies; False when some entries must wait and be
        resent (TRYAGAIN, CLUSTERDOWN...)."""
        if asks:
            out = b"".join([b"".join((_ASKING, cmd)) for cmd, _k in asks]) + batch
        else:
            out = batch
        expected = 2 * len(asks) + len(kinds)
        if ping:
            out = out + resp("PING") if out else resp("PING")
            expected += 1
        writer.write(out)
        replies = await self._replies(reader, hiredis.Reader(), expected)
        node.connected = True
        self.metrics.c["redis_batches"] += 1
        errors = [i for i, r in enumerate(replies) if isinstance(r, hiredis.ReplyError)]
        if not errors:  # the common case
            self.metrics.c["frames_published"] += frames + sum(k for _c, k in asks)
            return True
        if len(errors) == len(replies) and all(str(r).startswith(RETRY_ERRORS) for r in replies):
            # The node refused everything for now (CLUSTERDOWN during a failover):
            # all of it back as it was, nothing to parse.
            self.metrics.inc("redis_retried", len(asks) + len(kinds))
            self._put_back(node, asks, batch, kinds, per_call, frames)
            self._refresh.set()
            self._log_error(f"redis writer: {node.addr[0]}:{node.addr[1]} answered {replies[0]}; "
                            "resending")
            return False
        # Rare: some replies are errors. Find each refused command's bytes.
        host = node.addr[0]
        ok = True
        published = rejected = rejected_audio = 0
        resend: list[tuple[bytes, int]] = []  # back in front of their slot's primary, in order
        items = list(asks)
        if errors[-1] >= 2 * len(asks):
            items += [(bytes(batch[s:e]), kinds[i]) for i, (s, e, _) in enumerate(split_commands(batch))]
        else:
            published += frames  # all of the batch proper was written
        for j, (cmd, kind) in enumerate(items):
            reply = replies[2 * j + 1] if j < len(asks) else replies[len(asks) + j]
            if not isinstance(reply, hiredis.ReplyError):
                published += kind
                continue
            msg = str(reply)
            redirect = parse_redirect(msg, host)
            if redirect is not None:
                how, slot, addr = redirect
                target = self._node(addr)
                if how == "MOVED" or j < len(asks):
                    # (an ASK resend refused again: back through the slot's owner)
                    self.metrics.inc("redis_moved" if how == "MOVED" else "redis_ask")
                    if how == "MOVED" and 0 <= slot < SLOTS and self._owner[slot] is not target:
                        table = list(self._owner)
                        table[slot] = target
                        self._set_owners(table)
                        self._reroute(node)  # newer entries of that slot follow it
                    resend.append((cmd, kind))
                    self._refresh.set()
                else:
                    self.metrics.inc("redis_ask")
                    target.asks.append((cmd, kind))  # (still pending: now the target's)
                    target.wake.set()
                continue
            if msg.startswith(RETRY_ERRORS):
                self.metrics.inc("redis_retried")
                resend.append((cmd, kind))
                ok = False
                self._refresh.set()
                self._log_error(f"redis writer: {node.addr[0]}:{node.addr[1]} answered {msg}; "
                                "resending")
                continue
            rejected += 1
            rejected_audio += kind
            self._log_error(f"redis rejected a write: {msg}")
        if resend:
            self._requeue_commands(resend)
        if rejected:
            self.metrics.inc("redis_rejected", rejected)
            self.metrics.inc("frames_rejected", rejected_audio)
        self.metrics.c["frames_published"] += published
        return ok


def _slot_of(cmd: bytes) -> int:
    """The slot of one serialized command (rare path: reply errors, topology changes)."""
    reader = hiredis.Reader()
    reader.feed(cmd)
    return command_slot(reader.gets())
