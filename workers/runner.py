"""``piopiy-voice worker``: own calls, feed their events to an agent, publish commands.

Theory of operation
-------------------
One thread, one loop; the decisions of each call are made by its
``CallDriver`` (``piopiy_voice.workers.driver``: pure, no I/O), which returns
an ``Outcome``; this module only executes outcomes. Each turn of the loop:

1. renews leases (every lease/3) and drops at once any call whose lease is lost;
2. scans for calls to take over (every min(lease/4, 1 s)): start entries idle
   longer than the lease (dead owner) or handed back (see ``ownership``);
3. takes new calls from the calls stream (consumer group): a blocking read
   while it owns no call; while busy the same read (not blocking) goes in the
   round trip of step 4, so a new call's greeting waits for no poll period;
4. ONE blocking ``XREAD`` (block <= 200 ms while owning calls) over the
   streams of all owned calls, each from its own last processed id (on Redis
   Cluster one round trip per node instead: ``CallStreamReader``); each
   call's entries go to its driver strictly in order. Before any is fed,
   every call's agent gets the PCM of its audio entries (``hear_ahead``) and
   the calls' VADs score them together (``speech.vad.VoicingBatch``: three
   matrix products for all the turn's frames instead of three per frame). A
   call whose entries made its agent cut the playout (a barge-in:
   ``driver.URGENT_COMMANDS``)
   is committed and delivered at once, with its own two round trips, before
   the next call is fed: at 100 calls feeding the whole turn takes 10-50 ms
   of CPU, which a barge-in would otherwise wait for. Turns start at least
   ``PV_WORKER_MIN_TURN_MS`` (20) apart: an XREAD that returned as soon as
   any one frame arrived would carry ~0.2-0.3 entries per stream and the
   per-turn work (packing the XREAD, parsing, timers, commit scan: all
   proportional to the calls owned; Redis' side of the XREAD) would dominate
   the CPU. 20 ms (one frame per stream per turn) halved the worker's CPU at
   25 calls against 5 ms, for ~10-15 ms more barge-in latency
   (BENCHMARKS.md "Against pipecat");
5. timers: a ``Tick`` for calls whose agent asked for one and that are not
   behind; for calls just taken over and now read to the stream's end, the
   works lost with the previous owner (``CallDriver.caught_up``);
6. ONE pipelined round trip: dead letters and timeline notes, then per call
   the commands its outcomes produced, committed atomically with its checkpoint
   into the call's outbox (``piopiy_voice.workers.checkpoint``: a Lua script
   fenced by the lease); calls with no commands are checkpointed about once a
   second. A second round trip delivers the committed commands to their
   gateways' command streams (in order per call; undelivered ones are retried
   every turn before any later one) and restarts the idle time of the start
   entries (``Ownership.touch``). Then works are handed to the agent runtime
   and cancels sent (calls whose commit found the lease gone start nothing).

Slow agent work runs in the agent runtime (``piopiy_voice.workers.runtime``): an
asyncio loop on a background thread, started on the first work, whose results
come back as ``work.done`` entries in the call's own stream. So a slow model or
webhook never delays other calls' frames, barge-in or DTMF.

Entries are deduplicated by the gateway's per-call ``seq``; a jump in ``seq``
means entries were trimmed or lost before we read them: they are counted
(``frames_skipped_total``) and noted on the call's timeline. Entries that fail
to decode, or make the agent raise 3 times, go to ``keys.DEAD_LETTER_STREAM``
with the reason; the call goes on with the next entry.

A call whose gateway died for good never gets its ``call.ended``: its owner
ends it itself, with every renewal (see ``piopiy_voice.workers.orphans``).

Redis faults never stop the loop: connection errors and timeouts are retried
with backoff (then leases are renewed first); ``NOGROUP`` (Redis restarted
empty) recreates the group, re-takes the leases of the calls we hold, re-commits
their checkpoints from memory and re-announces their start entries (see
``piopiy_voice.workers.ownership``); ``OOM`` (``maxmemory`` reached) is logged
and counted, and for a few seconds no new call is taken (live calls first: their
commits are retried, new calls wait in the stream for a worker that can take
them). ``PV_WORKER_MAX_CALLS`` caps the calls one worker holds and
``PV_WORKER_CLAIM_PER_SCAN`` the calls one takeover scan claims, so after a
stall calls spread over the workers instead of landing on the first to scan.

Redis Cluster: every script touches one call's slot (commit, renew) or the
calls stream alone (touch), and the reads go through ``CallStreamReader``
(``piopiy_voice.workers.reader``): one blocking XREAD on a single Redis, one
pipelined XREAD per call grouped by node on a cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import redis

from piopiy_voice import callrecord, keys
from piopiy_voice.contracts import CallStarted, decode, encode
from piopiy_voice.redisconn import connect, resolve_redis_url
from piopiy_voice.settings import Settings
from piopiy_voice.speech.vad import VoicingBatch

from . import orphans
from .agent.base import Agent, load_agent_class
from .checkpoint import Checkpoint, Committer, LeaseLost, load, undelivered
from .driver import CallDriver, Outcome, _type_of
from .metrics import Metrics, serve
from .ownership import LOST, RELET, Ownership, ensure_group, is_nogroup, is_oom
from .reader import CallStreamReader
from .runtime import DEFAULT_CONCURRENCY, AgentRuntime, RedisPublisher

log = logging.getLogger("piopiy_voice.workers.runner")

READ_COUNT = 50
CHECKPOINT_EVERY_S = 1.0
IDLE_BLOCK_MS = 1000
BUSY_BLOCK_MS = 200
#: New calls taken per read (a blocking read while idle, one per turn while
#: busy): one, so a burst of new calls spreads over the workers reading the
#: group instead of landing on whichever read first (measured: 16 calls dialled
#: at once landed 15/1 on two workers with 20). A busy worker still takes one
#: per loop turn, hundreds per second.
NEW_CALLS_PER_READ = 1
#: After Redis refused a write for lack of memory, no new call is taken for this long (s).
OOM_SHED_S = 5.0
#: On a graceful stop, works still running (e.g. a ``call_ended`` webhook) get this long.
RUNTIME_STOP_GRACE_S = 1.0
#: ``WorkDone.error`` -> counter of final results that failed that way.
_WORK_FAILURES = {"timeout": "works_timed_out_total", "cancelled": "works_cancelled_total",
                  "lost": "works_lost_total"}


class OwnedCall:
    """A call this worker owns: its driver plus the runner's I/O bookkeeping."""

    __slots__ = ("driver", "start_entry", "last_commit", "since")

    def __init__(self, driver: CallDriver, start_entry: str, last_commit: float = 0.0) -> None:
        self.driver = driver
        self.start_entry = start_entry
        self.last_commit = last_commit
        #: Wall time this worker took the call (the "quiet since" floor of ``orphans.find``).
        self.since = time.time()

    @property
    def call(self) -> CallStarted:
        return self.driver.call

    @property
    def ckpt(self) -> Checkpoint:
        return self.driver.ckpt

    @property
    def ended(self) -> bool:
        return self.driver.ended


class Worker:
    """The worker runtime; ``run()`` until ``stop()`` (or SIGTERM), then hand back."""

    def __init__(
        self,
        settings: Settings,
        agent_cls: type[Agent],
        *,
        r: Any = None,
        worker_id: str | None = None,
        lease_ms: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.agent_cls = agent_cls
        self.r = r if r is not None else connect(
            resolve_redis_url(settings.redis_url), socket_timeout=settings.redis_socket_timeout_s
        )
        self.worker_id = worker_id or settings.worker_id
        self.lease_ms = int(lease_ms or settings.lease_ms)
        self.metrics = metrics or Metrics()
        self.max_calls = int(getattr(settings, "worker_max_calls", 0) or 0)
        self.own = Ownership(self.r, self.worker_id, self.lease_ms,
                             claim_limit=int(getattr(settings, "worker_claim_per_scan", 20) or 20))
        self.committer = Committer(self.r, self.worker_id, self.lease_ms)
        self.reader = CallStreamReader(self.r)
        #: The loop's VAD batch, reused every turn (step 4).
        self.voicing = VoicingBatch()
        self.calls: dict[str, OwnedCall] = {}
        #: Committed commands not yet seen on their gateway's stream, per call:
        #: (gateway id, [(seq, command or raw fields)...]) in order. Kept for
        #: calls ended or lost meanwhile too: they were decided.
        self._outbox: dict[str, tuple[str, list[tuple[int, Any]]]] = {}
        #: Started on the first work (agents that never ask for one cost nothing).
        self.runtime: AgentRuntime | None = None
        self._stopping = False
        self._next_renew = 0.0
        self._next_scan = 0.0
        self._next_log = time.monotonic() + 30.0
        self._adopted_restart = False
        self._xread_ms = 0.0
        self.min_turn_s = max(0, int(getattr(settings, "worker_min_turn_ms", 0) or 0)) / 1000.0
        self._turn_at = 0.0
        #: Until then (monotonic) no new call is taken: Redis said OOM.
        self._shed_until = 0.0
        #: Calls whose last read hit READ_COUNT (more entries waiting): no Tick for them.
        self._behind: set[str] = set()
        #: This turn's side effects (dead letters, timeline notes, record fields),
        #: sent in the commit round trip.
        self._io = self.r.pipeline(transaction=False)
        self._starts: list[tuple[str, Any]] = []
        self._cancels: list[str] = []

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        self._stopping = True

    def run(self, max_seconds: float | None = None) -> None:
        log.info("worker %s up: agent=%s lease=%dms", self.worker_id,
                 f"{self.agent_cls.__module__}:{self.agent_cls.__name__}", self.lease_ms)
        deadline = time.monotonic() + max_seconds if max_seconds else None
        backoff = 0.1
        try:
            while not self._stopping and (deadline is None or time.monotonic() < deadline):
                try:
                    self.step()
                    backoff = 0.1
                except redis.RedisError as exc:
                    if self.on_redis_error(exc):
                        continue  # repaired: go on at once
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            # Also on an unexpected error: other workers get the calls at once.
            try:
                self.hand_back_all()
            except redis.RedisError as exc:
                log.error("worker %s: hand-back failed (%s); calls will be claimed after "
                          "their leases expire", self.worker_id, exc)
            finally:
                if self.runtime is not None:
                    self.runtime.stop(RUNTIME_STOP_GRACE_S)

    def on_redis_error(self, exc: redis.RedisError) -> bool:
        """Classify a Redis failure of a loop turn (never fatal); True when it
        was repaired and the loop may go on without waiting."""
        # Whatever happened, renew (re-take, re-announce) before anything else.
        self._next_renew = 0.0
        if is_nogroup(exc):
            log.warning("worker %s: consumer group gone (%s): Redis restarted empty? "
                        "recreating it and re-announcing %d held call(s)", self.worker_id, exc,
                        len(self.calls))
            self._count("redis_group_recreated_total")
            try:
                ensure_group(self.r)
            except redis.RedisError as again:
                log.warning("worker %s: cannot recreate the group yet (%s)", self.worker_id, again)
                return False
            return True
        if is_oom(exc):
            self._count("redis_oom_total")
            self._shed_until = time.monotonic() + OOM_SHED_S
            log.error("worker %s: Redis is out of memory (maxmemory reached): %s; live calls "
                      "retried, no new call taken for %.0fs", self.worker_id, exc, OOM_SHED_S)
            return False
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            self._count("redis_unavailable_total")
            log.warning("worker %s: redis unavailable (%s); retrying", self.worker_id, exc)
            return False
        self._count("redis_errors_total")
        log.error("worker %s: redis error (%r); retrying", self.worker_id, exc)
        return False

    def _room(self) -> int:
        """How many more calls this worker may take now."""
        if time.monotonic() < self._shed_until:
            return 0
        if self.max_calls <= 0:
            return 1 << 30
        return max(0, self.max_calls - len(self.calls))

    def step(self) -> None:
        now = time.monotonic()
        if not self._adopted_restart:
            # A restart under the same worker id finds its own entries pending.
            self._adopted_restart = True
            for eid in self.own.my_pending():
                self._adopt(eid, self.own.fetch(eid), claimed=True)
        if now >= self._next_renew:
            self._renew()
            self._end_orphans()
        if now >= self._next_scan:
            # Taking over live calls goes before new calls, even while shedding
            # for memory; only the max-calls cap stops it.
            room = (1 << 30) if self.max_calls <= 0 else self.max_calls - len(self.calls)
            if room > 0:
                for eid, fields in self.own.claim_stale(limit=min(room, self.own.claim_limit)):
                    self._adopt(eid, fields, claimed=True)
            self._next_scan = now + min(self.lease_ms / 4000.0, 1.0)
        room = self._room()
        if not self.calls:
            if room > 0:
                for eid, fields in self.own.read_new(count=min(NEW_CALLS_PER_READ, room),
                                                     block_ms=self._block_ms(IDLE_BLOCK_MS)):
                    self._adopt(eid, fields, claimed=False)
            else:
                time.sleep(min(0.2, max(0.0, self._next_scan - time.monotonic())))
        t1 = time.monotonic()
        if self.calls:
            self._read_calls(self._block_ms(BUSY_BLOCK_MS), min(NEW_CALLS_PER_READ, room))
        t2 = time.monotonic()
        self._timers()
        self._commit_due()
        self.metrics.calls_owned = len(self.calls)
        if self.runtime is not None:
            self.metrics.works_in_flight = self.runtime.in_flight
        t3 = time.monotonic()
        if t3 - t1 > 0.25 + self._xread_ms / 1000:
            log.warning("worker %s: slow loop turn %.0f ms (ownership %.0f, read+decide "
                        "%.0f [xread %.0f], timers+commit %.0f)", self.worker_id, (t3 - now) * 1000,
                        (t1 - now) * 1000, (t2 - t1) * 1000, self._xread_ms, (t3 - t2) * 1000)
        if now >= self._next_log:
            log.info("worker %s: %s", self.worker_id, self.metrics.summary())
            self._next_log = now + 30.0

    def _block_ms(self, cap: int) -> int:
        until = min(self._next_renew, self._next_scan) - time.monotonic()
        wake = [w for w in (c.driver.next_wakeup() for c in self.calls.values()) if w is not None]
        if wake:
            until = min(until, min(wake) - time.time())
        return max(1, min(cap, int(until * 1000)))

    # ------------------------------------------------------------ ownership
    def _renew(self) -> None:
        t = time.monotonic()
        results = self.own.renew({cid: c.start_entry for cid, c in self.calls.items()})
        self._next_renew = t + self.lease_ms / 3000.0  # not on error: retried next turn
        for cid, (verdict, entry_ok) in results.items():
            oc = self.calls.get(cid)
            if oc is None:
                continue
            if verdict == LOST:
                log.warning("call %s: lease lost; dropping it", cid)
                self._drop(cid)
                continue
            if verdict == RELET:
                # Redis lost the lease (restarted empty, or a stall nobody used):
                # ours again; recreate the checkpoint from memory at once.
                log.warning("call %s: lease was gone and nobody took the call; re-taken by %s",
                            cid, self.worker_id)
                self._count("leases_retaken_total")
                oc.driver.dirty = True
                oc.last_commit = 0.0
                self._io.hset(keys.call_meta(cid), "owner", self.worker_id)
            if not entry_ok and not oc.ended:
                eid = self.own.reannounce(encode(oc.call))
                log.warning("call %s: start entry %s lost by Redis; re-announced as %s",
                            cid, oc.start_entry, eid)
                self._count("calls_reannounced_total")
                oc.start_entry = eid

    def _drop(self, cid: str) -> None:
        """The call's lease is gone: forget it; its works' results would be fenced."""
        self.metrics.inc("leases_lost_total")
        self.calls.pop(cid, None)
        if self.runtime is not None:
            self.runtime.cancel_call(cid)

    def _end_orphans(self) -> None:
        """End the calls whose gateway died for good (see ``piopiy_voice.workers.orphans``)."""
        ended = []
        wall = time.time()
        for oc, state, campaign in orphans.find(self.r, [oc for oc in self.calls.values()
                                                        if not oc.ended]):
            log.warning("call %s: gateway %s is gone and the call has been silent for %.0fs; "
                        "ending it", oc.call.call_id, oc.call.gateway_id, orphans.GATEWAY_LOST_S)
            self._apply(oc, oc.driver.end_orphan(wall))
            self.metrics.inc("calls_gateway_lost_total")
            ended.append((oc, state, campaign))
        if not ended:
            return
        self._flush([oc for oc, _, _ in ended])
        pipe = self.r.pipeline(transaction=False)
        for oc, state, campaign in ended:
            cid = oc.call.call_id
            if state in (b"live", None):
                callrecord.set_state(pipe, cid, "ended", end_reason="gateway_lost",
                                     gateway_id=oc.call.gateway_id,
                                     campaign=campaign.decode() if campaign else None)
            callrecord.expire_call(pipe, cid)
        pipe.execute()

    def _adopt(self, eid: str, fields: dict | None, *, claimed: bool) -> None:
        """Take the call announced by calls-stream entry ``eid`` (new, claimed
        or our own after a restart); ACK entries that announce nothing to own."""
        if fields is None:
            self.own.ack(eid)  # trimmed from the calls stream: nothing to adopt
            return
        try:
            started = decode(fields)
        except Exception as exc:  # noqa: BLE001 (poison entry: any failure)
            self._dead_letter("", eid, keys.CALLS_STREAM, f"decode failed: {exc}",
                              _type_of(fields))
            self.own.ack(eid)
            return
        if not isinstance(started, CallStarted):
            # e.g. call.ended: the owner learns of the end from the call's own stream.
            self.own.ack(eid)
            return
        cid = started.call_id
        owned = self.calls.get(cid)
        if owned is not None:
            if eid != owned.start_entry:
                # A repeated announcement of a call we own: ACK it, or it stays
                # pending for ever (only the start entry is renewed and ACKed).
                owned.driver._follow_gateway(started.gateway_id)
                self.own.ack(eid)
            return
        if not self.own.acquire(cid):
            holder = self.own.holder(cid)
            if holder != self.worker_id:
                if not claimed and holder and fields.get(b"reannounced_by") == holder.encode():
                    self.own.give_back(cid, eid, holder)  # its owner re-announced it for itself
                elif not claimed:
                    self.own.ack(eid)  # a repeated announcement of a call already owned
                elif holder:
                    # Live (or just dead) owner: the entry goes back to it, idle
                    # since its lease was last extended, so it is claimable the
                    # moment that lease expires (not a lease later).
                    self.own.give_back(cid, eid, holder)
                return
        # Read the checkpoint only once the lease is ours: read before, it could
        # be overtaken by the previous owner's last commit (then we would resume
        # from a stale position and re-issue commands it already published).
        ckpt = load(self.r, cid)
        if ckpt is not None and ckpt.done:
            state = self.r.hget(keys.call_meta(cid), "state")
            if state not in (b"live", b"suspended"):
                self.own.release(cid)  # truly ended: a late or repeated announcement
                self.own.ack(eid)
                return
            # The socket dropped and came back: resume the same agent state.
        try:
            oc = self._start_call(eid, started, ckpt)
        except Exception as exc:  # noqa: BLE001 (agent constructors are user code)
            log.exception("call %s: agent could not be started", cid)
            self._dead_letter(cid, eid, keys.CALLS_STREAM, f"agent start failed: {exc!r}",
                              _type_of(fields))
            self.own.release(cid)
            self.own.ack(eid)
            return
        self.calls[cid] = oc
        if oc.driver.pending:
            self._flush([oc])  # the greeting, atomically with the first checkpoint

    def _start_call(self, eid: str, started: CallStarted, ckpt: Checkpoint | None) -> OwnedCall:
        cid = started.call_id
        observe = self.metrics.observe_lag
        if ckpt is None:
            drv, out = CallDriver.start(self.agent_cls, self.settings, started, self.worker_id,
                                        observe, entry_id=eid)
            oc = OwnedCall(drv, eid)
            log.info("call %s: owned by %s", cid, self.worker_id)
        else:
            # Taking over: the socket may have moved since the start entry; the
            # record names the gateway holding it now.
            holder = self.r.hget(keys.call_meta(cid), "gateway_id")
            if holder and holder.decode() != started.gateway_id:
                started = started.model_copy(update={"gateway_id": holder.decode()})
            drv, out, kind = CallDriver.resume(self.agent_cls, self.settings, started, ckpt,
                                               self.worker_id, observe)
            oc = OwnedCall(drv, eid, last_commit=time.monotonic())
            again = [(int(f[b"seq"]), f) for f in undelivered(self.r, ckpt)]
            if again:
                # Committed by the previous owner, maybe never delivered: deliver
                # them again, first (the gateway drops those it has applied).
                self._outbox[cid] = (started.gateway_id, again)
                self._count("commands_redelivered_total", len(again))
            elif ckpt.sent_seq < ckpt.cmd_seq:
                ckpt.sent_seq = ckpt.cmd_seq  # the outbox expired with nothing to deliver
            if kind == "reconnect":
                self._count("calls_resumed_after_reconnect_total")
            else:
                self.metrics.inc("handbacks_total" if kind == "handback" else "claims_after_crash_total")
            log.info("call %s: claimed by %s after %s of %s, resuming after %s (%d work(s) in "
                     "flight)", cid, self.worker_id, kind, ckpt.owner or "?", ckpt.last_id,
                     len(drv.suspects))
        self._io.hset(keys.call_meta(cid), "owner", self.worker_id)
        self._apply(oc, out)
        return oc

    # ------------------------------------------------------------ the audio
    def _read_calls(self, block_ms: int, new_calls: int) -> None:
        """Step 4 (and 3 while busy): one round trip reads the owned calls'
        streams and, with ``new_calls`` > 0, up to that many new calls."""
        wait = self._turn_at + self.min_turn_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # batch by time: see the module docstring, step 4
        positions = {keys.call_stream(cid): c.ckpt.last_id for cid, c in self.calls.items()}
        pipe = self.r.pipeline(transaction=False)
        if new_calls > 0:
            self.own.queue_read_new(pipe, new_calls)
        t = self._turn_at = time.monotonic()
        new, resp = self.reader.read(pipe, positions, READ_COUNT, block_ms)
        self._xread_ms = (time.monotonic() - t) * 1000
        behind: set[str] = set()
        wall = time.time()
        fed: list[tuple[OwnedCall, list]] = []
        for stream, entries in resp or ():
            oc = self.calls.get(keys.call_id_of(stream))
            if oc is not None:
                oc.driver.hear_ahead(entries, self.voicing)
                fed.append((oc, entries))
        self.voicing.run()
        for oc, entries in fed:
            cid = oc.call.call_id
            if cid not in self.calls:
                continue   # dropped by an urgent commit's lease check this turn
            if len(entries) >= READ_COUNT:
                behind.add(cid)
            out = oc.driver.feed(entries, wall)
            self._apply(oc, out)
            if out.urgent:
                self._flush_urgent(oc)
        self._behind = behind
        for eid, fields in self.own.new_entries(new[0] if new else None):
            self._adopt(eid, fields, claimed=False)

    def _flush_urgent(self, oc: OwnedCall) -> None:
        """Commit and deliver one call's commands now, mid-turn (step 4). A
        failure leaves them pending for the turn's own commit, which retries
        them and handles the error; the turn must go on feeding the calls
        (and adopting the new ones) it has read."""
        try:
            self._flush([oc], urgent=True)
            self._count("urgent_commits_total")
        except redis.RedisError as exc:
            log.warning("call %s: urgent commit failed (%s); retried with the turn's commit",
                        oc.call.call_id, exc)

    def _timers(self) -> None:
        behind = self._behind
        wall = time.time()
        for cid, oc in list(self.calls.items()):
            if cid in behind:
                continue
            drv = oc.driver
            if drv.suspects or drv.replaying:
                out = drv.caught_up(wall)
                if out is not None:
                    self._apply(oc, out)
            out = drv.tick(wall)
            if out is not None:
                self._apply(oc, out)

    def _apply(self, oc: OwnedCall, out: Outcome) -> None:
        """Queue what an outcome asks for (the commands stay with the driver
        until they are committed)."""
        cid = oc.call.call_id
        m = self.metrics
        if out.entries:
            m.counters["entries_total"] += out.entries
        if out.skipped:
            m.inc("frames_skipped_total", out.skipped)
        for dl in out.dead_letters:
            self._dead_letter(cid, dl.entry_id, dl.stream, dl.reason, dl.type)
        for event, detail in out.notes:
            callrecord.timeline(self._io, cid, event, **detail)
        for work in out.works:
            self._starts.append((cid, work))
        if out.cancels:
            self._cancels += out.cancels
        for done in out.finished:
            if not done.ok:
                self._count(_WORK_FAILURES.get(done.error, "works_failed_total"))
        if out.ignored:
            self._count("work_results_ignored_total", out.ignored)
        if out.stale:
            self._count("stale_commands_suppressed_total", out.stale)

    def _count(self, name: str, n: int = 1) -> None:
        self.metrics.inc(name, n)  # every name is a declared family (workers.metrics)

    # -------------------------------------------------------------- commits
    def _commit_due(self) -> None:
        now = time.monotonic()
        due = [oc for oc in self.calls.values()
               if oc.driver.pending or oc.ended
               or (oc.driver.dirty and now - oc.last_commit >= CHECKPOINT_EVERY_S)]
        if due or len(self._io) or self._starts or self._cancels or self._outbox:
            self._flush(due)

    def _flush(self, ocs: list[OwnedCall], *, handback: bool = False,
               urgent: bool = False) -> list[bool]:
        """One round trip: this turn's side effects, then each call's commands
        with its checkpoint (each call's script is atomic); a second delivers
        what was committed (``_deliver``). Then start works: with ``urgent``
        (``_flush_urgent``) only those of ``ocs``, since other calls fed this
        turn are not committed yet."""
        pipe, self._io = self._io, self.r.pipeline(transaction=False)
        n_side = len(pipe)
        for oc in ocs:
            drv = oc.driver
            self.committer.commit(
                drv.checkpoint(handback=handback), drv.pending,
                release=drv.ended or handback,
                ttl_s=keys.CALL_KEY_TTL_AFTER_END if drv.ended else 0, pipe=pipe,
            )
        only = {oc.call.call_id for oc in ocs} if urgent else None
        if not len(pipe):
            self._deliver([])
            self._start_works(set(), only=only)
            return []
        try:
            replies = pipe.execute(raise_on_error=False)[n_side:]
        except Exception:
            for oc in ocs:
                oc.driver.uncommitted()
            raise
        ok: list[bool] = []
        dropped: set[str] = set()
        failed: set[str] = set()
        errors: list[Exception] = []
        after = self.r.pipeline(transaction=False)
        touch: list[str] = []
        mono = time.monotonic()
        for oc, reply in zip(ocs, replies):
            drv = oc.driver
            cid = drv.call.call_id
            try:
                sent = self.committer.check(cid, reply)
            except LeaseLost:
                log.warning("call %s: lease lost at commit; dropping it", cid)
                drv.uncommitted()
                self._drop(cid)
                dropped.add(cid)
                ok.append(False)
                continue
            except redis.RedisError as exc:
                # e.g. OOM: nothing of this commit was written; retried next turn.
                drv.uncommitted()
                failed.add(cid)
                errors.append(exc)
                ok.append(False)
                continue
            ok.append(True)
            if drv.pending:
                self.metrics.inc("decisions_total", sent)
                gw, queued = self._outbox.setdefault(cid, (drv.call.gateway_id, []))
                queued += [(cmd.seq, cmd) for cmd in drv.pending]
                for cmd in drv.pending:
                    callrecord.timeline(after, cid, "worker.command", command=cmd.type,
                                        command_id=cmd.command_id, worker=self.worker_id)
                log.info("call %s: sent %s", cid, ", ".join(c.type for c in drv.pending))
            drv.committed()
            oc.last_commit = mono
            if drv.ended:
                after.xack(keys.CALLS_STREAM, keys.WORKERS_GROUP, oc.start_entry)
                self.calls.pop(cid, None)
                self.metrics.inc("calls_finished_total")
                callrecord.timeline(after, cid, "worker.released", worker=self.worker_id,
                                    reason="ended")
                log.info("call %s: ended; released by %s", cid, self.worker_id)
            elif not handback:
                touch.append(oc.start_entry)
        self.own.touch(touch, pipe=after)
        self._deliver(ocs, after)
        self._start_works(dropped, failed, only=only)
        if errors:
            raise errors[0]
        return ok

    def _deliver(self, ocs: list[OwnedCall], after: Any = None) -> None:
        """The delivery round trip (step 6): every committed, undelivered command
        XADDed to its gateway's stream, in order per call, with ``after`` (this
        turn's post-commit writes). A call whose delivery failed keeps the rest
        of its commands for the next turn; a delivered one's checkpoint learns it
        (``sent_seq``, written with its next commit)."""
        if after is None:
            if not self._outbox:
                return
            after = self.r.pipeline(transaction=False)
        n_before = len(after)
        plan: list[tuple[str, int]] = []
        for cid, (gateway_id, queued) in self._outbox.items():
            oc = self.calls.get(cid)
            gw = oc.call.gateway_id if oc is not None else gateway_id
            plan.append((cid, self.committer.deliver(after, gw, (c for _, c in queued))))
        if not len(after):
            return
        replies = after.execute(raise_on_error=False)[n_before:]
        i = 0
        for cid, n in plan:
            gateway_id, queued = self._outbox[cid]
            mine = replies[i:i + n]
            i += n
            done = 0
            for reply in mine:
                if isinstance(reply, Exception):
                    break
                done += 1
            if done < n:
                self._count("command_deliveries_retried_total", n - done)
                log.warning("call %s: %d command(s) not delivered to gateway %s yet (%s); retried",
                            cid, n - done, gateway_id, mine[done])
            oc = self.calls.get(cid)
            if done and oc is not None:
                oc.ckpt.sent_seq = max(oc.ckpt.sent_seq, queued[done - 1][0])
                oc.driver.dirty = True
            if done == n:
                del self._outbox[cid]
            else:
                del queued[:done]

    def _start_works(self, dropped: set[str], failed: set[str] = frozenset(),
                     only: set[str] | None = None) -> None:
        """Hand this turn's works to the runtime (after the commit: a call
        found lost starts nothing; a call whose commit failed starts them after
        its next commit; with ``only``, calls not in it wait for their commit)
        and send its cancels."""
        if self._starts:
            starts, self._starts = self._starts, []
            for cid, work in starts:
                if cid in dropped:
                    continue
                if cid in failed or (only is not None and cid not in only):
                    self._starts.append((cid, work))
                    continue
                if self.runtime is None:
                    self.runtime = self._make_runtime()
                self.runtime.submit(cid, work)
                self._count("works_started_total")
        if self._cancels:
            cancels, self._cancels = self._cancels, []
            if self.runtime is not None:
                for work_id in cancels:
                    self.runtime.cancel(work_id)

    def _make_runtime(self) -> AgentRuntime:
        # The same Redis as the loop's client: its pool's kwargs, or a cluster client itself.
        publisher = RedisPublisher(self.r if self.reader.clustered
                                   else self.r.connection_pool.connection_kwargs, self.worker_id)
        concurrency = getattr(self.settings, "agent_runtime_concurrency", DEFAULT_CONCURRENCY)
        log.info("worker %s: agent runtime up (at most %d works at once)", self.worker_id,
                 concurrency)
        return AgentRuntime(publisher, concurrency=concurrency, name=f"agent-runtime-{self.worker_id}",
                            on_close=publisher.close)

    def hand_back_all(self) -> None:
        """Graceful stop: final checkpoints, leases deleted, start entries
        made claimable at once."""
        live = [oc for oc in self.calls.values() if not oc.ended]
        self._flush([oc for oc in self.calls.values() if oc.ended])
        done = self._flush(live, handback=True)
        entries = [oc.start_entry for oc, ok in zip(live, done) if ok]
        pipe = self.r.pipeline(transaction=False)
        for oc, ok in zip(live, done):
            if ok:
                callrecord.timeline(pipe, oc.call.call_id, "worker.handback", worker=self.worker_id)
        pipe.execute()
        self.calls.clear()
        self.own.hand_back(entries)
        self.own.leave_group()
        log.info("worker %s stopped; handed back %d call(s)", self.worker_id, len(entries))

    def _dead_letter(self, cid: str, eid: str, stream: str, reason: str, etype: str = "") -> None:
        self.metrics.inc("dead_letters_total")
        log.error("call %s: entry %s dead-lettered: %s", cid or "?", eid, reason)
        self._io.xadd(keys.DEAD_LETTER_STREAM, {
            "call_id": cid, "entry_id": eid, "stream": stream, "reason": reason[:500],
            "type": etype, "worker": self.worker_id, "t": f"{time.time():.3f}",
        }, maxlen=keys.DEAD_LETTER_MAXLEN, approximate=True)


# ------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piopiy-voice worker",
                                description="Own calls, feed their events to an agent, publish commands.")
    p.add_argument("--agent", help="agent class 'package.module:Class' (default: PV_AGENT)")
    p.add_argument("--webhook", metavar="URL",
                   help="use the webhook agent posting turn events to URL (overrides --agent)")
    p.add_argument("--worker-id", help="consumer name / lease value (default: PV_WORKER_ID)")
    p.add_argument("--lease-ms", type=int, help="call lease in ms (default: PV_LEASE_MS)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="bind address for --metrics-port")
    p.add_argument("--max-seconds", type=float, help="stop (gracefully) after this long")
    return p


def main(argv: list[str] | None = None) -> int:
    from piopiy_voice.observability import run_loop_role, setup_logging  # noqa: PLC0415 (main only)

    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.webhook:
        overrides["agent_webhook_url"] = args.webhook
    try:
        settings = Settings.from_env(**overrides)
        setup_logging("worker", level=settings.log_level, fmt=settings.log_format,
                      instance=args.worker_id or settings.worker_id)
        if args.lease_ms is not None and args.lease_ms <= 100:
            raise ValueError(f"--lease-ms must be > 100, got {args.lease_ms}")
        if args.webhook and not args.webhook.startswith(("http://", "https://")):
            raise ValueError(f"--webhook must be an http(s):// URL, got {args.webhook!r}")
        spec = "piopiy_voice.workers.agent.webhook:WebhookAgent" if args.webhook else (args.agent or settings.agent)
        agent_cls = load_agent_class(spec)
        metrics = Metrics()
        worker = Worker(settings, agent_cls, worker_id=args.worker_id, lease_ms=args.lease_ms,
                        metrics=metrics)
    except ValueError as exc:
        print(f"piopiy-voice worker: {exc}", file=sys.stderr)
        return 2
    return run_loop_role("worker", worker, lambda host, port: serve(metrics, host, port),
                         args.metrics_host, args.metrics_port, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
