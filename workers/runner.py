"""``piopiy-voice worker``: own calls, feed their events to an agent, publish commands.

Theory of operation
-------------------
One thread, one loop. Each turn of the loop:

1. renews leases (every lease/3) and drops at once any call whose lease is lost;
2. scans for calls to take over (every min(lease/4, 1 s)): start entries idle
   longer than the lease (dead owner) or handed back (see ``ownership``);
3. takes new calls from the calls stream (consumer group; blocking when idle,
   polled every 100 ms while busy);
4. ONE blocking ``XREAD`` (block <= 200 ms while owning calls) over the
   streams of all owned calls, each from its own last processed id, and feeds
   each call's entries to its agent strictly in order;
5. fires agent timers (``Tick``) for calls that are not behind;
6. commits: the commands a call's batch produced are published atomically with
   the checkpoint at the batch's last entry (``piopiy_voice.workers.checkpoint``); calls that
   produced no commands are checkpointed about once a second. All of a turn's
   commits go out in one pipelined round trip (each call's script is atomic).

Entries are deduplicated by the gateway's per-call ``seq``; a jump in ``seq``
means entries were trimmed or lost before we read them: they are counted
(``frames_skipped_total``) and noted on the call's timeline. Entries that fail
to decode, or make the agent raise 3 times, go to ``keys.DEAD_LETTER_STREAM``
with the reason; the call goes on with the next entry.

A call whose gateway died for good never gets its ``call.ended``: its owner
ends it itself, with every renewal (see ``piopiy_voice.workers.orphans``).

Redis Cluster: the one XREAD spans many calls' slots and the commit script
touches the gateway's command stream, so workers need a single Redis (or
Sentinel); see ``piopiy_voice.workers.checkpoint``.

The agent is called synchronously: a slow agent (e.g. a webhook) delays the
other calls of this worker, so keep webhook timeouts short and run more workers.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from piopiy_voice import callrecord, keys
from piopiy_voice.contracts import CallEnded, CallStarted, decode
from piopiy_voice.redisconn import connect, resolve_redis_url
from piopiy_voice.settings import Settings

from . import orphans
from .agent.base import Agent, Tick, load_agent_class
from .checkpoint import Checkpoint, Committer, LeaseLost, load
from .metrics import Metrics, serve
from .orphans import id_ms
from .ownership import Ownership

log = logging.getLogger("piopiy_voice.workers.runner")

AGENT_ATTEMPTS = 3
READ_COUNT = 50
CHECKPOINT_EVERY_S = 1.0
IDLE_BLOCK_MS = 1000
BUSY_BLOCK_MS = 200
NEW_CALLS_POLL_S = 0.1

@dataclass
class OwnedCall:
    call: CallStarted
    start_entry: str
    agent: Agent
    ckpt: Checkpoint
    pending: list[Any] = field(default_factory=list)
    dirty: bool = False
    last_commit: float = 0.0
    tick_quiet_until: float = 0.0
    ended: bool = False
    #: Wall time this worker took the call (the "quiet since" floor of ``orphans.find``).
    since: float = field(default_factory=time.time)


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
        self.own = Ownership(self.r, self.worker_id, self.lease_ms)
        self.committer = Committer(self.r, self.worker_id, self.lease_ms)
        self.calls: dict[str, OwnedCall] = {}
        self._stopping = False
        self._next_renew = 0.0
        self._next_scan = 0.0
        self._next_log = time.monotonic() + 30.0
        self._adopted_restart = False
        self._next_new = 0.0
        self._xread_ms = 0.0
        #: Calls whose last read hit READ_COUNT (more entries waiting): no Tick for them.
        self._behind: set[str] = set()

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
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("worker %s: redis unavailable (%s); retrying in %.1fs",
                                self.worker_id, exc, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            # Also on an unexpected error: other workers get the calls at once.
            try:
                self.hand_back_all()
            except redis.RedisError as exc:
                log.error("worker %s: hand-back failed (%s); calls will be claimed after "
                          "their leases expire", self.worker_id, exc)

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
            for eid, fields in self.own.claim_stale():
                self._adopt(eid, fields, claimed=True)
            self._next_scan = now + min(self.lease_ms / 4000.0, 1.0)
        if not self.calls or now >= self._next_new:
            # While busy, new calls are polled every NEW_CALLS_POLL_S, not every turn.
            block = None if self.calls else self._block_ms(IDLE_BLOCK_MS)
            for eid, fields in self.own.read_new(count=20, block_ms=block):
                self._adopt(eid, fields, claimed=False)
            self._next_new = time.monotonic() + NEW_CALLS_POLL_S
        t1 = time.monotonic()
        if self.calls:
            self._read_calls(self._block_ms(BUSY_BLOCK_MS))
        t2 = time.monotonic()
        self._timers()
        self.metrics.calls_owned = len(self.calls)
        t3 = time.monotonic()
        if t3 - t1 > 0.25 + self._xread_ms / 1000:
            log.warning("worker %s: slow loop turn %.0f ms (ownership %.0f, read+decide+commit "
                        "%.0f [xread %.0f], timers %.0f)", self.worker_id, (t3 - now) * 1000,
                        (t1 - now) * 1000, (t2 - t1) * 1000, self._xread_ms, (t3 - t2) * 1000)
        if now >= self._next_log:
            log.info("worker %s: %s", self.worker_id, self.metrics.summary())
            self._next_log = now + 30.0

    def _block_ms(self, cap: int) -> int:
        until = min(self._next_renew, self._next_scan) - time.monotonic()
        wake = [w for w in (c.agent.next_wakeup() for c in self.calls.values()) if w is not None]
        if wake:
            until = min(until, min(wake) - time.time())
        return max(1, min(cap, int(until * 1000)))

    # ------------------------------------------------------------ ownership
    def _renew(self) -> None:
        t = time.monotonic()
        lost = self.own.renew({cid: c.start_entry for cid, c in self.calls.items()})
        self._next_renew = t + self.lease_ms / 3000.0  # not on error: retried next turn
        for cid in lost:
            log.warning("call %s: lease lost; dropping it", cid)
            self.metrics.inc("leases_lost_total")
            self.calls.pop(cid, None)

    def _end_orphans(self) -> None:
        """End the calls whose gateway died for good (see ``piopiy_voice.workers.orphans``)."""
        ended = []
        for oc, state, campaign in orphans.find(self.r, [oc for oc in self.calls.values()
                                                        if not oc.ended]):
            cid = oc.call.call_id
            log.warning("call %s: gateway %s is gone and the call has been silent for %.0fs; "
                        "ending it", cid, oc.call.gateway_id, orphans.GATEWAY_LOST_S)
            ev = CallEnded(call_id=cid, seq=0, reason="gateway_lost")
            self._call_agent(oc, ev, time.time(), oc.ckpt.last_id)
            oc.pending = []  # nobody left to send them to
            oc.ended = True
            self.metrics.inc("calls_gateway_lost_total")
            ended.append((oc, state, campaign))
        if not ended:
            return
        self._commit_many([oc for oc, _, _ in ended])
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
            self._dead_letter("", eid, keys.CALLS_STREAM, f"decode failed: {exc}", fields)
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
                self._follow_gateway(owned, started.gateway_id)
                self.own.ack(eid)
            return
        if not self.own.acquire(cid):
            holder = self.own.holder(cid)
            if holder != self.worker_id:
                if not claimed:
                    self.own.ack(eid)  # a repeated announcement of a call already owned
                elif holder:
                    # Live owner: give the entry back to it (its renew would anyway).
                    self.r.xclaim(keys.CALLS_STREAM, keys.WORKERS_GROUP, holder, 0, [eid], justid=True)
                return
        # Read the checkpoint only once the lease is ours: read before, it could
        # be overtaken by the previous owner's last commit (then we would resume
        # from a stale position and re-issue commands it already published).
        ckpt = load(self.r, cid)
        if ckpt is not None and ckpt.done:
            self.own.release(cid)
            self.own.ack(eid)
            return
        try:
            oc = self._start_call(eid, started, ckpt)
        except Exception as exc:  # noqa: BLE001 (agent constructors are user code)
            log.exception("call %s: agent could not be started", cid)
            self._dead_letter(cid, eid, keys.CALLS_STREAM, f"agent start failed: {exc!r}", fields)
            self.own.release(cid)
            self.own.ack(eid)
            return
        self.calls[cid] = oc
        if oc.pending:
            self._commit(oc)  # the greeting, atomically with the first checkpoint

    def _follow_gateway(self, oc: OwnedCall, gateway_id: str) -> None:
        """Send the call's commands to ``gateway_id`` from now on (the socket moved)."""
        if gateway_id and gateway_id != oc.call.gateway_id:
            log.warning("call %s: socket moved from gateway %s to %s; commands follow it",
                        oc.call.call_id, oc.call.gateway_id, gateway_id)
            oc.call = oc.call.model_copy(update={"gateway_id": gateway_id})

    def _start_call(self, eid: str, started: CallStarted, ckpt: Checkpoint | None) -> OwnedCall:
        cid = started.call_id
        if ckpt is not None:
            # Taking over: the socket may have moved since the start entry; the
            # record names the gateway holding it now.
            holder = self.r.hget(keys.call_meta(cid), "gateway_id")
            if holder and holder.decode() != started.gateway_id:
                started = started.model_copy(update={"gateway_id": holder.decode()})
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.call_meta(cid), "owner", self.worker_id)
        if ckpt is None:
            agent = self.agent_cls(started, self.settings)  # may raise: see _adopt
            ckpt = Checkpoint(call_id=cid, runtime={"seq": started.seq, "skipped": 0})
            oc = OwnedCall(started, eid, agent, ckpt)
            cmds = self._call_agent(oc, started, started.started_at, eid)
            self._stamp(oc, cmds)
            oc.dirty = True
            callrecord.timeline(pipe, cid, "worker.owned", worker=self.worker_id)
            log.info("call %s: owned by %s", cid, self.worker_id)
            pipe.execute()
            return oc
        agent = self.agent_cls.from_state(started, self.settings, ckpt.state or {})
        oc = OwnedCall(started, eid, agent, ckpt, last_commit=time.monotonic())
        kind = "handback" if ckpt.runtime.get("handed_back") else "crash"
        ckpt.runtime.pop("handed_back", None)
        self.metrics.inc("handbacks_total" if kind == "handback" else "claims_after_crash_total")
        callrecord.timeline(pipe, cid, "worker.claimed", worker=self.worker_id, previous=ckpt.owner,
                            after=kind, resume_from=ckpt.last_id)
        pipe.execute()
        log.info("call %s: claimed by %s after %s of %s, resuming after %s",
                 cid, self.worker_id, kind, ckpt.owner or "?", ckpt.last_id)
        return oc

    # ------------------------------------------------------------ the audio
    def _read_calls(self, block_ms: int) -> None:
        streams = {keys.call_stream(cid): c.ckpt.last_id for cid, c in self.calls.items()}
        t = time.monotonic()
        resp = self.r.xread(streams, count=READ_COUNT, block=block_ms)
        self._xread_ms = (time.monotonic() - t) * 1000
        behind: set[str] = set()
        for stream, entries in resp or ():
            skey = stream.decode() if isinstance(stream, bytes) else stream
            cid = skey[skey.index("{") + 1: skey.rindex("}")]
            oc = self.calls.get(cid)
            if oc is None:
                continue
            if len(entries) >= READ_COUNT:
                behind.add(cid)
            self._process(oc, entries)
            if time.monotonic() >= self._next_renew:
                # A slow agent (webhook) must not let this worker's leases lapse.
                self._renew()
        self._behind = behind
        now = time.monotonic()
        self._commit_many([
            oc for oc in self.calls.values()
            if oc.pending or oc.ended or (oc.dirty and now - oc.last_commit >= CHECKPOINT_EVERY_S)
        ])

    def _process(self, oc: OwnedCall, entries: list) -> None:
        rt = oc.ckpt.runtime
        cid = oc.call.call_id
        wall = time.time()
        observe = self.metrics.observe_lag
        ckpt = oc.ckpt
        oc.dirty = True  # XREAD never returns a stream with no entries
        n = 0
        try:
            for raw_id, fields in entries:
                n += 1
                eid = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                t = id_ms(eid) / 1000.0
                observe(max(0.0, wall - t))
                ckpt.last_id = eid
                try:
                    ev = decode(fields)
                except Exception as exc:  # noqa: BLE001
                    self._dead_letter(cid, eid, keys.call_stream(cid), f"decode failed: {exc}", fields)
                    raw_seq = fields.get(b"seq", b"")
                    if raw_seq.isdigit() and int(raw_seq) > rt.get("seq", 0):
                        rt["seq"] = int(raw_seq)  # a poison entry is not a gap
                    continue
                seq = ev.seq
                if seq > 0:
                    last = rt.get("seq", 0)
                    if seq <= last:
                        continue  # duplicate (gateway resent after a reconnect)
                    if seq > last + 1 and last > 0:
                        self._skipped(oc, seq - last - 1, eid)
                    rt["seq"] = seq
                if ev.type == "call.started":
                    # Given to the agent from the calls stream already; a later one means
                    # the platform reconnected to another gateway: follow the socket.
                    self._follow_gateway(oc, ev.gateway_id)
                    continue
                cmds = self._call_agent(oc, ev, t, eid)
                if cmds:
                    self._stamp(oc, cmds)
                if isinstance(ev, CallEnded):
                    oc.ended = True
                    break
        finally:
            self.metrics.counters["entries_total"] += n

    def _skipped(self, oc: OwnedCall, n: int, eid: str) -> None:
        oc.ckpt.runtime["skipped"] = oc.ckpt.runtime.get("skipped", 0) + n
        self.metrics.inc("frames_skipped_total", n)
        log.warning("call %s: %d entries missing before %s (trimmed or lost)", oc.call.call_id, n, eid)
        pipe = self.r.pipeline(transaction=False)
        callrecord.timeline(pipe, oc.call.call_id, "worker.skipped", entries=n, before=eid)
        pipe.execute()

    def _call_agent(self, oc: OwnedCall, ev: Any, now: float, eid: str) -> list[Any]:
        err: Exception | None = None
        for _ in range(AGENT_ATTEMPTS):
            try:
                cmds = oc.agent.on_event(ev, now)
                # Most calls return a (fresh, usually empty) list: no copy per frame.
                return cmds if cmds.__class__ is list else list(cmds or ())
            except Exception as exc:  # noqa: BLE001 (agents are user code)
                err = exc
        cid = oc.call.call_id
        log.error("call %s: agent raised %d times on %s: %r", cid, AGENT_ATTEMPTS, eid, err)
        self._dead_letter(cid, eid, keys.call_stream(cid), f"agent raised: {err!r}", None,
                          etype=getattr(ev, "type", ""))
        return []

    def _stamp(self, oc: OwnedCall, cmds: list[Any]) -> None:
        for cmd in cmds:
            oc.ckpt.cmd_seq += 1
            cmd.call_id = oc.call.call_id
            cmd.seq = oc.ckpt.cmd_seq
            cmd.command_id = f"{oc.call.call_id}:{oc.ckpt.cmd_seq}"
            cmd.issued_by = f"worker:{self.worker_id}"
            oc.pending.append(cmd)

    def _timers(self) -> None:
        behind = self._behind
        wall = time.time()
        mono = time.monotonic()
        for cid, oc in list(self.calls.items()):
            if cid in behind or oc.ended or mono < oc.tick_quiet_until:
                continue
            wake = oc.agent.next_wakeup()
            if wake is None or wall < wake:
                continue
            try:
                cmds = list(oc.agent.on_event(Tick(), wall) or ())
            except Exception as exc:  # noqa: BLE001
                log.error("call %s: agent raised on tick: %r", cid, exc)
                oc.tick_quiet_until = mono + 1.0
                continue
            oc.dirty = True
            if cmds:
                self._stamp(oc, cmds)
                self._commit(oc)

    # -------------------------------------------------------------- commits
    def _commit(self, oc: OwnedCall, *, handback: bool = False) -> bool:
        return self._commit_many([oc], handback=handback)[0]

    def _commit_many(self, ocs: list[OwnedCall], *, handback: bool = False) -> list[bool]:
        """Commit several calls in one round trip (each call's script is atomic)."""
        if not ocs:
            return []
        pipe = self.r.pipeline(transaction=False)
        for oc in ocs:
            ckpt = oc.ckpt
            ckpt.state = oc.agent.to_state()
            ckpt.done = oc.ended
            if handback:
                ckpt.runtime["handed_back"] = True
            self.committer.commit(
                ckpt, oc.call.gateway_id, oc.pending, release=oc.ended or handback,
                ttl_s=keys.CALL_KEY_TTL_AFTER_END if oc.ended else 0, pipe=pipe,
            )
            ckpt.runtime.pop("handed_back", None)
        replies = pipe.execute(raise_on_error=False)
        ok: list[bool] = []
        after = self.r.pipeline(transaction=False)
        mono = time.monotonic()
        for oc, reply in zip(ocs, replies):
            cid = oc.call.call_id
            try:
                sent = self.committer.check(cid, reply)
            except LeaseLost:
                log.warning("call %s: lease lost at commit; dropping it", cid)
                self.metrics.inc("leases_lost_total")
                self.calls.pop(cid, None)
                ok.append(False)
                continue
            ok.append(True)
            if oc.pending:
                self.metrics.inc("decisions_total", sent)
                for cmd in oc.pending:
                    callrecord.timeline(after, cid, "worker.command", command=cmd.type,
                                        command_id=cmd.command_id, worker=self.worker_id)
                log.info("call %s: sent %s", cid, ", ".join(c.type for c in oc.pending))
            oc.pending = []
            oc.dirty = False
            oc.last_commit = mono
            if oc.ended:
                after.xack(keys.CALLS_STREAM, keys.WORKERS_GROUP, oc.start_entry)
                self.calls.pop(cid, None)
                self.metrics.inc("calls_finished_total")
                callrecord.timeline(after, cid, "worker.released", worker=self.worker_id,
                                    reason="ended")
                log.info("call %s: ended; released by %s", cid, self.worker_id)
        if len(after):
            after.execute()
        return ok

    def hand_back_all(self) -> None:
        """Graceful stop: final checkpoints, leases deleted, start entries
        made claimable at once."""
        live = [oc for oc in self.calls.values() if not oc.ended]
        self._commit_many([oc for oc in self.calls.values() if oc.ended])
        done = self._commit_many(live, handback=True)
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

    def _dead_letter(self, cid: str, eid: str, stream: str, reason: str, fields: dict | None,
                     etype: str = "") -> None:
        if not etype and fields:
            t = fields.get(b"type", fields.get("type", b""))
            etype = t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
        self.metrics.inc("dead_letters_total")
        log.error("call %s: entry %s dead-lettered: %s", cid or "?", eid, reason)
        self.r.xadd(keys.DEAD_LETTER_STREAM, {
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
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.webhook:
        overrides["agent_webhook_url"] = args.webhook
    try:
        settings = Settings.from_env(**overrides)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
    if args.metrics_port is not None:
        server = serve(metrics, args.metrics_host, args.metrics_port)
        log.info("metrics on http://%s:%d/metrics", args.metrics_host, server.server_port)

    def _graceful(signum, _frame):
        log.info("worker %s: signal %d, handing calls back", worker.worker_id, signum)
        worker.stop()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    worker.run(max_seconds=args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
