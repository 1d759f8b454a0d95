"""The gateway's Redis writer: every call's entries, batched on one connection.

Theory of operation
-------------------
At 50 frames per second per call, a client library's per-command overhead
(building a command object, a pipeline, parsing each reply into Python) costs
more than receiving the frame did. So the hot path here writes the Redis
protocol (RESP) by hand into one ``bytearray``: each call has a precomputed
prefix (``XADD <stream> MAXLEN ~ N * type audio v 1 call_id <id> seq``) and a
frame appends only its seq and PCM bytes. The writer is a consumer of the
audio entry contract, not a second author: the prefix is built from
``contracts.audio_head`` and ``AUDIO_FIELD_NAMES`` (version, names, order,
field count), so a change there changes what is written here. One flusher task owns the connection
and keeps exactly one batch in flight: while Redis answers the previous batch,
new entries accumulate, so batches grow with load. Below ``batch_min``
queued entries the flusher first lingers ``linger_s`` (2 ms) for more: a batch
costs about the same whatever its size, so at light load this halves the
per-frame cost for ~2 ms of latency. Replies are parsed by hiredis
and only counted (errors are logged). A batch's replies are awaited with no
timer of their own (an ``asyncio.timeout`` costs ~6 us of Python, and there
are ~250 batches a second at 25 calls): one watchdog timer per connection,
``_watch_replies``, cuts the connection when a batch has waited longer than
``reply_timeout`` (checked every quarter of it), which fails the batch like
any lost connection.

All writes for a call go through this one ordered byte stream, so the call's
entries (start, audio, events, results, playout, end) land in Redis in the
order they were produced.

TLS (``rediss://``): the connection is opened with the one client context of
``redisconn.tls_context_for`` (the ``PV_REDIS_TLS_*`` settings); TLS lives
below the stream API, so the hot path is the same bytes either way. A
certificate that fails verification is an outage with a one-line reason naming
the setting (``last_error``, the log), retried like any other.

Sentinel (``redis+sentinel://`` URLs, see ``redisconn``): the writer has no
fixed address. Every (re)connect asks the sentinels where the primary is now
(``redisconn.PrimaryLocator``) and checks with ``ROLE`` that the node it
reached is a primary. While connected it asks them again every
``primary_check_s`` (1 s): after a failover that left the old primary running
(``SENTINEL FAILOVER``, a partition healed) the old one keeps accepting writes
until the sentinels demote it, about 10 s later, and everything written there
meanwhile is discarded when it resyncs; so when the sentinels name another
node the writer reconnects to it at once (between batches: nothing in flight
is lost by the switch).

Redis Cluster (``redis+cluster://`` / ``rediss+cluster://``): ``Publisher(url)``
returns a ``cluster_route.ClusterPublisher``, this writer once per primary
(one buffer, connection and flusher each), every entry routed by its key's
hash slot, following MOVED/ASK, failovers and resharding; its theory is in
that module. This class, the single-server path, is unchanged by it.

Demoted primary (any URL: Sentinel, or a managed Redis whose DNS name moves
to the new primary on failover): a ``READONLY`` reply counts as a lost
connection: the whole batch is resent after reconnecting (what the demoted
node accepted before it was demoted is discarded when it resyncs from the new
primary, so resending all of it loses nothing and at worst duplicates
entries, as any resend does). A replica answers at once, so reconnecting to
one backs off like a failed connect until a batch is accepted.

Outage: when the connection fails the in-flight batch is put back in front of
the buffer (resent after reconnect: at-least-once; consumers drop duplicates
by ``seq``) and the flusher reconnects with exponential backoff. *Any* failure
of a write counts as a lost connection (under uvloop a write on a reset
connection raises ``RuntimeError``, not ``ConnectionError``), and the flusher
task runs under a supervisor that restarts it (with backoff) should it die
anyway, so the writer never silently stops. ``connected`` is true only after
Redis answered a command on the current connection (PING at connect, then each
batch), never on a bare TCP connect.

Fairness: audio beyond ``buffer_frames`` buffered frames is refused
(``add_audio`` returns False) and so is a call's audio beyond ``call_frames``
of its own (``full_for`` tells the caller which limit refused it): one call's
backlog is bounded separately, so a flooding call loses its own frames, never
another call's. Platform events are dropped (and counted) once the buffer
holds ``max_bytes``; control entries are never refused (they are few).

Metrics: a batch's audio counts as published only when Redis accepted it;
errors Redis answers (e.g. OOM at ``maxmemory``) are counted as rejected, and
audio ones as dropped (``redis_rejected``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Mapping

import hiredis
from redis.asyncio.connection import ConnectionPool

from piopiy_voice import contracts, keys
from piopiy_voice.redisconn import (
    PrimaryLocator, RedisTls, is_cluster_url, is_sentinel_url, parse_sentinel_url, tls_context_for,
    tls_error,
)

from .metrics import Metrics

log = logging.getLogger(__name__)


def _bulk(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
    elif isinstance(v, str):
        b = v.encode()
    else:
        b = str(v).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def resp(*args: Any) -> bytes:
    """One command in the Redis protocol."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


#: An idle writer PINGs Redis this often, so ``connected`` notices a dead link.
IDLE_PING_S = 1.0

# The two per-frame fields of an audio entry, last in the contract's order.
_SEQ_NAME, _PCM_NAME = contracts.AUDIO_FIELD_NAMES[-2:]
_PCM_ARG = _bulk(_PCM_NAME)


def append_audio(buf: bytearray, prefix: bytes, seq: int, pcm: bytes) -> None:
    """Append one audio entry's XADD to ``buf``: ``prefix`` (``audio_prefix``:
    the command, key and fields before the seq), then the seq and the PCM. The
    one writer of that RESP, for the single-server and the cluster writers."""
    s = b"%d" % seq
    buf += prefix
    buf += b"$%d\r\n%s\r\n%s$%d\r\n" % (len(s), s, _PCM_ARG, len(pcm))
    buf += pcm
    buf += b"\r\n"


class _Demoted(ConnectionError):
    """Redis answered READONLY: the node we write to is a replica now."""


def _demoted(replies: list, errors: list[int]) -> bool:
    """Redis answered READONLY: we are connected to a replica (a demoted primary)."""
    return any(str(replies[i]).startswith("READONLY") for i in errors)


class Publisher:
    def __new__(cls, url: str, *args: Any, **kwargs: Any) -> "Publisher":
        # A cluster URL gets the routing writer (``cluster_route``): same API,
        # one connection per primary. The single-server class stays as it was.
        if cls is Publisher and is_cluster_url(url):
            from .cluster_route import ClusterPublisher  # noqa: PLC0415 (it imports this module)

            cls = ClusterPublisher
        return super().__new__(cls)

    def __init__(self, url: str, *, metrics: Metrics | None = None,
                 buffer_frames: int = 50_000, stream_maxlen: int = keys.CALL_STREAM_MAXLEN,
                 connect_timeout: float = 3.0, reply_timeout: float = 10.0,
                 linger_s: float = 0.002, batch_min: int = 128,
                 event_bytes: int = 4 << 20, call_frames: int | None = None,
                 tls: RedisTls | None = None, primary_check_s: float = 1.0) -> None:
        if buffer_frames <= 0:
            raise ValueError(f"buffer_frames must be > 0, got {buffer_frames}")
        if linger_s < 0 or batch_min < 1:
            raise ValueError("linger_s must be >= 0 and batch_min >= 1")
        self.linger = linger_s
        self.batch_min = batch_min
        #: Sentinel URL: asked for the primary's address on every (re)connect.
        self._locate: PrimaryLocator | None = None
        #: (Sentinel) the primary we are connected to, and how often to ask whether it still is.
        self._primary: tuple[str, int] | None = None
        self._primary_moved = False
        self.primary_check_s = primary_check_s
        self._watcher: asyncio.Task | None = None
        self._address(url, tls, connect_timeout)
        self.metrics = metrics or Metrics()
        self.limit = buffer_frames
        #: Per-call bound of buffered audio frames (one call's backlog).
        self.call_limit = call_frames or max(500, buffer_frames // 10)
        #: audio prefix (one per call) -> that call's frames in ``_buf``.
        self._per_call: dict[bytes, int] = {}
        #: One byte per command in ``_buf``: 1 audio, 0 anything else (to tell
        #: which replies were audio when Redis rejects some).
        self._kinds = bytearray()
        #: Bound of the whole buffer for entries that may be refused (platform
        #: events): what full audio takes (32 kHz frames) plus some headroom.
        self.max_bytes = buffer_frames * 1400 + event_bytes
        self.maxlen = b"%d" % stream_maxlen
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self._buf = bytearray()
        self._n = 0  # commands in _buf
        self.frames = 0  # audio frames in _buf (bounded by limit)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.connected = False
        self._writer: asyncio.StreamWriter | None = None
        self._err_logged = 0.0
        #: (commands, audio frames) of the batch awaiting Redis' replies.
        self._inflight = (0, 0)
        self._supervisor: asyncio.Task | None = None
        self._inflight_batch: tuple[bytearray, bytearray, dict] | None = None
        #: Loop time the in-flight batch was written (None: none in flight),
        #: and whether the watchdog cut the connection for its late replies.
        self._sent_at: float | None = None
        self._reply_late = False
        self._watchdog: asyncio.TimerHandle | None = None
        #: Why the writer last failed (for /readyz), "" when healthy.
        self.last_error = ""

    def _address(self, url: str, tls: RedisTls | None, connect_timeout: float) -> None:
        """Where to write: one server, or the sentinels' primary."""
        #: Client TLS context for rediss:// (None: plain TCP or a unix socket);
        #: PiopiyConfigError naming the setting when a CA/cert file is unusable.
        self._ssl = tls_context_for(url, tls)
        if is_sentinel_url(url):
            spec = parse_sentinel_url(url)
            self._locate = PrimaryLocator(spec, self._ssl, timeout_s=connect_timeout)
            self._addr = None, "", 0
            self._auth = (spec.username, spec.password)
            self._db = spec.db
        else:
            kw = ConnectionPool.from_url(url).connection_kwargs
            self._addr = kw.get("path"), kw.get("host", "127.0.0.1"), kw.get("port", 6379)
            self._auth = (kw.get("username"), kw.get("password"))
            self._db = int(kw.get("db") or 0)

    # ------------------------------------------------------------ producers
    def audio_prefix(self, call_id: str) -> bytes:
        """Everything of a call's audio XADD before the seq value (built once per call)."""
        args: list[Any] = ["XADD", keys.call_stream(call_id), "MAXLEN", "~", self.maxlen, "*"]
        for name, value in contracts.audio_head(call_id).items():
            args += [name, value]
        args.append(_SEQ_NAME)
        # + the seq value, the pcm field's name and its value (``add_audio``)
        return b"*%d\r\n" % (len(args) + 3) + b"".join(_bulk(a) for a in args)

    def add_audio(self, prefix: bytes, seq: int, pcm: bytes) -> bool:
        """Queue one audio entry; False (nothing queued) when the buffer, or this
        call's share of it, is full (``full_for`` says which)."""
        if self.frames >= self.limit:
            return False
        per_call = self._per_call
        n = per_call.get(prefix, 0)
        if n >= self.call_limit:
            return False
        per_call[prefix] = n + 1
        self._kinds.append(1)
        append_audio(self._buf, prefix, seq, pcm)
        self._n += 1
        self.frames += 1
        if not self._wake.is_set():
            self._wake.set()
        return True

    def room_for(self, prefix: bytes) -> bool:
        """``add_audio`` would take a frame of this call now (neither the buffer
        nor this call's share of it is full)."""
        return self.frames < self.limit and self._per_call.get(prefix, 0) < self.call_limit

    def full_for(self, prefix: bytes) -> str:
        """Why ``add_audio`` refused a frame of this call: ``redis_unavailable``
        (the whole buffer is full: Redis is away or too slow) or ``call_backlog``
        (this call alone filled its share)."""
        if self.frames >= self.limit or not self.connected:
            return "redis_unavailable"
        return "call_backlog"

    @property
    def pending_frames(self) -> int:
        """Audio frames not yet acknowledged by Redis: buffered plus in flight."""
        return self.frames + self._inflight[1]

    @property
    def alive(self) -> bool:
        """The writer task is running (or restarting after a crash)."""
        return self._supervisor is not None and not self._supervisor.done()

    @property
    def has_room(self) -> bool:
        """False while an outage has filled the buffer: refusable entries
        (platform events) should then be dropped and counted by the caller."""
        return len(self._buf) < self.max_bytes

    def command(self, *args: Any) -> None:
        """Queue any Redis command (never refused)."""
        self._buf += resp(*args)
        self._n += 1
        self._kinds.append(0)
        if not self._wake.is_set():
            self._wake.set()

    def xadd(self, name: str, fields: Mapping[str, Any], maxlen: int | None = None,
             approximate: bool = True) -> None:
        args: list[Any] = ["XADD", name]
        if maxlen is not None:
            args += ["MAXLEN", "~" if approximate else "=", maxlen]
        args.append("*")
        for k, v in fields.items():
            args += [k, v]
        self.command(*args)

    def hset(self, name: str, key: str | None = None, value: Any = None,
             mapping: Mapping[str, Any] | None = None) -> None:
        items = dict(mapping or {})
        if key is not None:
            items[key] = value
        args: list[Any] = ["HSET", name]
        for k, v in items.items():
            args += [k, v]
        self.command(*args)

    def expire(self, name: str, time_s: int) -> None:
        self.command("EXPIRE", name, int(time_s))

    # ---------------------------------------------------------------- flush
    def start(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(
                self._supervise(), name="publisher")
        if self._locate is not None and self.primary_check_s > 0 and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch_primary(), name="publisher-primary-watch")

    async def _watch_primary(self) -> None:
        """(Sentinel) Flag the connection for a switch when the sentinels name
        another primary than the one we write to."""
        assert self._locate is not None
        while True:
            await asyncio.sleep(self.primary_check_s)
            if self._primary is None or self._primary_moved:
                continue
            try:
                named = await asyncio.wait_for(self._locate(), self.connect_timeout)
            except Exception:  # noqa: BLE001 (sentinels unreachable: keep writing where we are)
                continue
            if self._primary is not None and named != self._primary:
                log.warning("redis writer: the sentinels name %s:%d as the primary now (was %s:%d); "
                            "switching", *named, *self._primary)
                self._primary_moved = True
                self._wake.set()

    async def _supervise(self) -> None:
        """Run the flusher; should it die (a bug, an exception nobody foresaw),
        put its batch back and start it again after a backoff."""
        backoff = 0.05
        while True:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="publisher-flusher")
            try:
                await self._task
                return  # closed
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if not self._closing and me is not None and not me.cancelling():
                    continue  # the flusher alone was cancelled: restart it
                self._task.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 (the writer must never stay dead)
                self._requeue_inflight()
                self._drop_conn()
                self.last_error = f"writer died: {exc!r}"
                self.metrics.inc("writer_restarts")
                log.exception("redis writer died; restarting in %.2fs", backoff)
                self._wake.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _requeue_inflight(self) -> None:
        batch = self._inflight_batch
        if batch is None:
            return
        buf, kinds, per_call = batch
        self._inflight_batch = None
        n, frames = self._inflight
        self._inflight = (0, 0)
        self._buf[:0] = buf
        self._kinds[:0] = kinds
        self._n += n
        self.frames += frames
        for k, v in per_call.items():
            self._per_call[k] = self._per_call.get(k, 0) + v
        self._idle.set()

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far has been acknowledged by Redis."""
        deadline = time.monotonic() + timeout
        while self._n or not self._idle.is_set():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Flush for up to ``timeout``, then stop. What could not be written is
        logged and its audio counted in ``frames_dropped``."""
        await self.flush(timeout)
        self._closing = True
        self._wake.set()
        if self._watcher is not None:
            self._watcher.cancel()
        sup = self._supervisor
        if sup:
            sup.cancel()
            if self._task:
                self._task.cancel()
            try:
                await sup
            except asyncio.CancelledError:
                pass
        lost, lost_frames = self._n + self._inflight[0], self.frames + self._inflight[1]
        if lost:
            self.metrics.inc("frames_dropped_closing", lost_frames)
            log.warning("redis writer closing: discarding %d unwritten entries (%d audio frames)",
                        lost, lost_frames)
        self._buf, self._n, self.frames, self._inflight = bytearray(), 0, 0, (0, 0)
        self._kinds, self._per_call = bytearray(), {}
        self._drop_conn()
        if self._locate is not None:
            await self._locate.aclose()

    def _drop_conn(self) -> None:
        self.connected = False
        self._primary = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path, host, port = self._addr
        if self._locate is not None:
            host, port = await asyncio.wait_for(self._locate(), self.connect_timeout)
        commands = [resp("SELECT", self._db)] if self._db else []
        # A PING answered: Redis is really there (a TCP connect proves nothing,
        # e.g. a stopped server's socket still accepts).
        commands.append(resp("PING"))
        if self._locate is not None:
            # The sentinels may lag behind a failover: only a primary takes writes.
            commands.append(resp("ROLE"))
        reader, writer, replies = await self._greet(host, port, commands, path=path)
        if self._locate is not None:
            if not (replies[-1] and replies[-1][0] == b"master"):
                writer.close()
                raise ConnectionError(f"{host}:{port} is not the primary (ROLE {replies[-1][:1]!r})")
            self._primary, self._primary_moved = (host, port), False
        return reader, writer

    async def _greet(self, host: str, port: int, commands: list[bytes], *,
                     path: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list]:
        """The one connection handshake of both writers: connect (a unix
        socket, TLS or plain TCP, within ``connect_timeout``), AUTH when a
        password is set, then ``commands``, pipelined in one write. Any error
        reply fails the handshake (``ConnectionError``, the socket closed).
        Returns (reader, writer, the replies to ``commands``)."""
        if path:
            fut = asyncio.open_unix_connection(path)
        elif self._ssl is not None:
            fut = asyncio.open_connection(host, port, ssl=self._ssl, server_hostname=host)
        else:
            fut = asyncio.open_connection(host, port)
        try:
            reader, writer = await asyncio.wait_for(fut, self.connect_timeout)
        except ssl.SSLError as exc:
            raise tls_error(exc, host, port) from None
        hello = []
        user, password = self._auth
        if password:
            hello.append(resp("AUTH", user, password) if user else resp("AUTH", password))
        hello += commands
        writer.write(b"".join(hello))
        try:
            replies = await self._replies(reader, hiredis.Reader(), len(hello))
        except BaseException:
            writer.close()
            raise
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                writer.close()
                where = path or f"{host}:{port}"
                raise ConnectionError(f"redis handshake with {where} failed: {reply}")
        return reader, writer, replies[len(hello) - len(commands):]

    async def _replies(self, reader: asyncio.StreamReader, rd: Any, n: int) -> list:
        """``n`` replies, within ``reply_timeout`` (connection handshakes; the
        cluster writer's reads)."""
        async with asyncio.timeout(self.reply_timeout):
            return await self._read_replies(reader, rd, n)

    async def _read_replies(self, reader: asyncio.StreamReader, rd: Any, n: int) -> list:
        """``n`` replies, with no timer of its own: the flusher's batches,
        whose connection the watchdog (``_watch_replies``) cuts if it stays
        silent."""
        out: list = []
        while len(out) < n:
            data = await reader.read(1 << 18)
            if not data:
                if self._reply_late:
                    raise TimeoutError(f"no reply from redis within {self.reply_timeout:g} s")
                raise ConnectionError("redis closed the connection")
            rd.feed(data)
            while (reply := rd.gets()) is not False:
                out.append(reply)
        return out

    def _watch_replies(self, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle:
        """Every quarter of ``reply_timeout``: a batch unanswered for longer
        than ``reply_timeout`` cuts the connection (the flusher then resends
        it after reconnecting). Returns the next check's handle."""
        sent, writer = self._sent_at, self._writer
        if sent is not None and writer is not None and loop.time() - sent > self.reply_timeout:
            self._reply_late = True
            writer.transport.abort()
        return loop.call_later(self.reply_timeout / 4, self._rearm_watch, loop)

    def _rearm_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = self._watch_replies(loop)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = self._watch_replies(loop)
        try:
            await self._flush_forever(loop)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog, self._sent_at = None, None

    async def _flush_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        backoff = 0.05
        #: A replica answers at once, every time: wait this long before asking again.
        demoted_backoff = 0.05
        reader = writer = None
        rd = hiredis.Reader()
        self._wake.set()  # connect now: readiness must not wait for the first entry
        while True:
            if not self._wake.is_set():
                # Idle for a second: a PING keeps ``connected`` true to fact (a
                # timer handle, not wait_for: this runs once per batch).
                ping = loop.call_later(IDLE_PING_S, self.command, "PING")
                await self._wake.wait()
                ping.cancel()
            if self._closing and not self._n:
                return
            if self._primary_moved and writer is not None:
                # (between batches: nothing is in flight on the old primary)
                self._drop_conn()
                writer = None
            if writer is None:
                self._reply_late = False
                try:
                    reader, writer = await self._connect()
                except Exception as exc:  # noqa: BLE001 (uvloop: RuntimeError too)
                    self.connected = False
                    self.last_error = f"cannot connect: {exc!r}"
                    self.metrics.inc("redis_errors")
                    self._log_error(f"redis writer cannot connect ({exc!r}); "
                                    f"{self.frames} frames buffered, retry in {backoff:.2f}s")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                self._writer = writer
                rd = hiredis.Reader()
                if not self.connected:
                    self.metrics.inc("redis_reconnects")
                    log.info("redis writer connected")
                self.connected = True
                self.last_error = ""
                backoff = 0.05
            if self._n < self.batch_min and self.linger:
                # A batch costs two syscalls and two task switches whatever its
                # size: waiting a moment for more entries is the cheapest way to
                # cut the per-frame cost, at the price of `linger` latency.
                await asyncio.sleep(self.linger)
            batch, n, frames = self._buf, self._n, self.frames
            kinds, per_call = self._kinds, self._per_call
            self._buf, self._n, self.frames = bytearray(), 0, 0
            self._kinds, self._per_call = bytearray(), {}
            self._wake.clear()
            if not n:
                continue
            self._idle.clear()
            self._inflight = (n, frames)
            self._inflight_batch = (batch, kinds, per_call)
            try:
                self._sent_at = loop.time()
                writer.write(batch)
                replies = await self._read_replies(reader, rd, n)
                errors = [i for i, reply in enumerate(replies) if isinstance(reply, hiredis.ReplyError)]
                if errors and _demoted(replies, errors):
                    raise _Demoted("READONLY: the node is a replica now (failover); resending")
            except Exception as exc:  # noqa: BLE001 (uvloop raises RuntimeError on a reset socket)
                # Resend the whole batch after reconnecting: at-least-once.
                self._requeue_inflight()
                self._wake.set()
                self.connected = False
                self.last_error = f"connection lost: {exc!r}"
                self.metrics.inc("redis_errors")
                self._log_error(f"redis writer lost its connection ({exc!r}); buffering")
                self._drop_conn()
                writer = None
                if isinstance(exc, _Demoted):
                    await asyncio.sleep(demoted_backoff)
                    demoted_backoff = min(demoted_backoff * 2, 2.0)
                continue
            finally:
                self._sent_at = None
                self._idle.set()
            # Not reset when cancelled mid-batch: close() counts that batch as lost.
            self._inflight = (0, 0)
            self._inflight_batch = None
            self.connected = True
            demoted_backoff = 0.05
            self.metrics.c["redis_batches"] += 1
            rejected = rejected_audio = 0
            for i in errors:
                rejected += 1
                rejected_audio += kinds[i]
                self._log_error(f"redis rejected a write: {replies[i]}")
            if rejected:
                self.metrics.inc("redis_rejected", rejected)
                self.metrics.inc("frames_rejected", rejected_audio)
            self.metrics.c["frames_published"] += frames - rejected_audio

    def _log_error(self, text: str) -> None:
        # An outage produces one error per retry: keep the log readable.
        now = time.monotonic()
        if now - self._err_logged >= 1.0:
            self._err_logged = now
            log.warning(text)
