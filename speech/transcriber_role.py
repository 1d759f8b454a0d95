"""``piopiy-voice transcriber``: own calls' recognition, append Transcript entries.

Theory of operation
-------------------
A stateless process, one thread (recognition is CPU-bound and holds the GIL:
scale by running more processes). It owns calls exactly like a worker does
(``workers.ownership.Ownership``) but under its own consumer group
``keys.TRANSCRIBERS_GROUP``, lease keys ``keys.call_asr_lease`` and heartbeat
set ``keys.TRANSCRIBERS_ZSET``: every call is owned once by a worker and once
by a transcriber. Each turn of the loop:

1. renews its leases every lease/3 (a lost lease drops the call at once) and
   scans for calls to take over (dead owner, handed back);
2. takes new calls from ``pv:calls``;
3. reads the streams of all owned calls, each from its own position (ONE
   blocking ``XREAD``; on Redis Cluster one round trip per node,
   ``piopiy_voice.workers.reader``), feeds each call's entries to its
   ``CallTranscriber`` (the turn's frames of all calls scored first in one
   VAD batch, ``speech.vad.VoicingBatch``, as the worker does);
4. commits per call: the Transcript entries produced are XADDed to the call's
   own stream *atomically* with the transcriber checkpoint
   (``keys.call_asr_checkpoint``: the safe resume point), by a Lua script that
   first checks the asr lease is still ours (fencing: a paused owner that lost
   its call cannot append). Calls with no output are checkpointed about once
   a second.

Our own Transcript entries come back in the next XREAD of that stream and are
skipped like any entry the core does not use. On ``call.ended`` the call's last
segment is finished, the checkpoint is marked done (and expires with the
call's keys), the start entry ACKed and the lease released. A call whose
gateway died (record state ``ended`` and its stream silent for 5 s) is ended
the same way. SIGTERM: checkpoints, leases released, start entries handed back
for another transcriber to claim at once.

Redis faults never stop the loop (same rules as the worker,
``piopiy_voice.workers.runner``): connection errors are retried with backoff
and leases renewed first; ``NOGROUP`` (Redis restarted empty) recreates the
``transcribers`` group, and the renew re-takes the leases of the calls held,
re-announces their lost start entries and re-commits their checkpoints from
memory (``piopiy_voice.workers.ownership``); ``OOM`` is logged and counted and
no new call is taken for a few seconds. A call announced again while its
record is live or suspended (the socket came back) is transcribed again from
its checkpoint even if that checkpoint says done.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from piopiy_voice import keys
from piopiy_voice.contracts import CallEnded, CallStarted, audio_pcms, decode, encode
from piopiy_voice.errors import PiopiyError
from piopiy_voice.observability import run_loop_role, setup_logging
from piopiy_voice.redisconn import connect, redact_url, resolve_redis_url, script_call
from piopiy_voice.settings import Settings
from piopiy_voice.workers.ownership import LOST, RELET, Ownership, ensure_group, is_nogroup, is_oom
from piopiy_voice.workers.reader import CallStreamReader

from .asr import Recognizer, make_recognizer
from .config import SpeechConfig
from .errors import SpeechError
from .vad import VoicingBatch
from .transcriber import CallTranscriber
from .transcriber_metrics import REDIS_ERROR_COUNTERS, TranscriberMetrics, serve

log = logging.getLogger("piopiy_voice.speech.transcriber")

READ_COUNT = 100
BUSY_BLOCK_MS = 200
IDLE_BLOCK_MS = 1000
CHECKPOINT_EVERY_S = 1.0
ORPHAN_QUIET_S = 5.0
#: After Redis refused a write for lack of memory, no new call is taken for this long (s).
OOM_SHED_S = 5.0

# The lease is ours, or missing while the checkpoint is missing or still ours
# (Redis restarted empty: see piopiy_voice.workers.ownership): then re-taken.
# KEYS: lease, inbound stream, asr checkpoint, transcript stream. ARGV: id,
# stream maxlen, checkpoint, done, ttl (0: live), n entries, lease ms,
# transcript maxlen; then per entry its field count, "1" if it is a final
# (also appended to the transcript stream, which outlives the audio), fields.
_COMMIT_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then
  if cur then return -1 end
  local owner = redis.call('HGET', KEYS[3], 'owner')
  if owner and owner ~= ARGV[1] then return -1 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[7])
end
local n = tonumber(ARGV[6])
local i = 9
for _ = 1, n do
  local nf = tonumber(ARGV[i]); local final = ARGV[i + 1]; i = i + 2
  local fields = {}
  for j = 0, nf * 2 - 1 do fields[#fields + 1] = ARGV[i + j] end
  i = i + nf * 2
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
  if final == '1' then redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', unpack(fields)) end
end
redis.call('HSET', KEYS[3], 'state', ARGV[3], 'done', ARGV[4], 'owner', ARGV[1])
if tonumber(ARGV[5]) > 0 then
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  redis.call('EXPIRE', KEYS[4], ARGV[5])
else
  redis.call('PERSIST', KEYS[3])
end
return n
"""


@dataclass
class OwnedCall:
    call: CallStarted
    start_entry: str
    core: CallTranscriber
    read_from: str
    pending: list = field(default_factory=list)
    dirty: bool = False
    last_commit: float = 0.0
    last_entry: float = field(default_factory=time.monotonic)
    meta_ended: bool = False
    last_segment: int = -1


class Transcriber:
    def __init__(self, r: Any, transcriber_id: str, lease_ms: int, recognizer: Recognizer,
                 config: SpeechConfig | None = None, metrics: TranscriberMetrics | None = None) -> None:
        self.r = r
        self.id = transcriber_id
        self.lease_ms = int(lease_ms)
        self.recognizer = recognizer
        self.config = config or SpeechConfig()
        self.metrics = metrics or TranscriberMetrics()
        self.own = Ownership(r, transcriber_id, self.lease_ms, group=keys.TRANSCRIBERS_GROUP,
                             lease_key=keys.call_asr_lease, members=keys.TRANSCRIBERS_ZSET,
                             checkpoint_key=keys.call_asr_checkpoint)
        self._commit_script = r.register_script(_COMMIT_LUA)
        self.reader = CallStreamReader(r)
        #: The loop's VAD batch, reused every turn (step 3).
        self.voicing = VoicingBatch()
        self.calls: dict[str, OwnedCall] = {}
        self._stopping = False
        self._next_renew = 0.0
        self._next_scan = 0.0
        self._adopted_restart = False
        self._shed_until = 0.0

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        self._stopping = True

    def run(self, max_seconds: float | None = None) -> None:
        log.info("transcriber %s up: asr=%s vad=%s lease=%dms", self.id, self.recognizer.name,
                 self.config.vad, self.lease_ms)
        deadline = time.monotonic() + max_seconds if max_seconds else None
        backoff = 0.1
        try:
            while not self._stopping and (deadline is None or time.monotonic() < deadline):
                try:
                    self.step()
                    backoff = 0.1
                except redis.RedisError as exc:
                    if self.on_redis_error(exc):
                        continue
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            try:
                self.hand_back_all()
            except redis.RedisError as exc:
                log.error("transcriber %s: hand-back failed (%s)", self.id, exc)

    def on_redis_error(self, exc: redis.RedisError) -> bool:
        """Classify a Redis failure (never fatal); True when repaired at once."""
        self._next_renew = 0.0  # renew (re-take, re-announce) before anything else
        kind = ("nogroup" if is_nogroup(exc) else "oom" if is_oom(exc)
                else "unavailable" if isinstance(exc, (redis.ConnectionError, redis.TimeoutError))
                else "other")
        self.metrics.counters[REDIS_ERROR_COUNTERS[kind]] += 1  # exported as redis_errors_total{kind}
        if kind == "nogroup":
            log.warning("transcriber %s: group gone (%s): Redis restarted empty? recreating it",
                        self.id, exc)
            try:
                ensure_group(self.r, keys.TRANSCRIBERS_GROUP)
            except redis.RedisError:
                return False
            return True
        if kind == "oom":
            self._shed_until = time.monotonic() + OOM_SHED_S
            log.error("transcriber %s: Redis is out of memory: %s; no new call for %.0fs",
                      self.id, exc, OOM_SHED_S)
        elif kind == "unavailable":
            log.warning("transcriber %s: redis unavailable (%s); retrying", self.id, exc)
        else:
            log.error("transcriber %s: redis error (%r); retrying", self.id, exc)
        return False

    def step(self) -> None:
        now = time.monotonic()
        if not self._adopted_restart:
            self._adopted_restart = True
            for eid in self.own.my_pending():
                self._adopt(eid, self.own.fetch(eid), claimed=True)
        if now >= self._next_renew:
            self._renew()
        if now >= self._next_scan:
            for eid, fields in self.own.claim_stale():
                self._adopt(eid, fields, claimed=True)
            self._next_scan = now + min(self.lease_ms / 4000.0, 1.0)
        block = None if self.calls else min(IDLE_BLOCK_MS, max(1, int((self._next_scan - now) * 1000)))
        if time.monotonic() >= self._shed_until:
            for eid, fields in self.own.read_new(count=20, block_ms=block):
                self._adopt(eid, fields, claimed=False)
        elif not self.calls:
            time.sleep(0.2)
        if self.calls:
            self._read_calls()
        self.metrics.calls_owned = len(self.calls)

    # ------------------------------------------------------------ ownership
    def _renew(self) -> None:
        t = time.monotonic()
        results = self.own.renew({cid: c.start_entry for cid, c in self.calls.items()})
        self._next_renew = t + self.lease_ms / 3000.0
        for cid, (verdict, entry_ok) in results.items():
            if verdict == LOST:
                log.warning("call %s: asr lease lost; dropping it", cid)
                oc = self.calls.pop(cid, None)
                if oc:
                    oc.core.close()
                continue
            oc = self.calls[cid]
            if verdict == RELET:
                log.warning("call %s: asr lease was gone and nobody took the call; re-taken", cid)
                oc.dirty = True
                oc.last_commit = 0.0
            if not entry_ok:
                eid = self.own.reannounce(encode(oc.call))
                log.warning("call %s: start entry lost by Redis; re-announced as %s", cid, eid)
                oc.start_entry = eid
        if self.calls:
            pipe = self.r.pipeline(transaction=False)
            cids = list(self.calls)
            for cid in cids:
                pipe.hget(keys.call_meta(cid), "state")
            for cid, state in zip(cids, pipe.execute()):
                self.calls[cid].meta_ended = state == b"ended"

    def _adopt(self, eid: str, fields: dict | None, *, claimed: bool) -> None:
        if fields is None:
            self.own.ack(eid)
            return
        try:
            started = decode(fields)
        except Exception as exc:  # noqa: BLE001 (poison entry)
            log.error("calls entry %s undecodable (%s); skipped", eid, exc)
            self.own.ack(eid)
            return
        if not isinstance(started, CallStarted):
            self.own.ack(eid)
            return
        cid = started.call_id
        owned = self.calls.get(cid)
        if owned is not None:
            if eid != owned.start_entry:
                self.own.ack(eid)
            return
        if not self.own.acquire(cid):
            holder = self.own.holder(cid)
            if holder != self.id:
                if not claimed and holder and fields.get(b"reannounced_by") == holder.encode():
                    self.own.give_back(cid, eid, holder)
                elif not claimed:
                    self.own.ack(eid)
                elif holder:
                    self.own.give_back(cid, eid, holder)
                return
        # Read the checkpoint only once the lease is ours (see workers.runner).
        raw = self.r.hgetall(keys.call_asr_checkpoint(cid))
        state: dict[str, Any] = {}
        if raw:
            if raw.get(b"done") == b"1" and self.r.hget(keys.call_meta(cid), "state") not in (
                    b"live", b"suspended"):
                self.own.release(cid)
                self.own.ack(eid)
                return
            try:
                state = json.loads(raw.get(b"state", b"{}"))
            except ValueError:
                log.error("call %s: unreadable asr checkpoint; starting from the stream's start", cid)
        c = self.config
        try:
            core = CallTranscriber(cid, started.rate, self.recognizer, vad=c.vad, onset_ms=c.turn_onset_ms,
                                   lead_in_ms=c.turn_lead_in_ms,
                                   hangover_ms=c.turn_hangover_ms, preroll_ms=c.asr_preroll_ms,
                                   tail_ms=c.asr_tail_ms, state=state)
        except (SpeechError, ValueError) as exc:
            log.error("call %s: cannot transcribe (%s); leaving it", cid, exc)
            self.own.release(cid)
            self.own.ack(eid)
            return
        read_from = state.get("last_id", "0-0")
        self.calls[cid] = OwnedCall(started, eid, core, read_from, last_commit=time.monotonic())
        log.info("call %s: transcribed by %s (%s from %s)", cid, self.id,
                 "resuming" if state else "new", read_from)

    # ------------------------------------------------------------ the audio
    def _read_calls(self) -> None:
        streams = {keys.call_stream(cid): oc.read_from for cid, oc in self.calls.items()}
        _, resp = self.reader.read(self.r.pipeline(transaction=False), streams, READ_COUNT,
                                   BUSY_BLOCK_MS)
        now = time.monotonic()
        for stream, entries in resp or ():
            oc = self.calls.get(keys.call_id_of(stream))
            if oc is not None:
                oc.core.hear_ahead(audio_pcms(entries), self.voicing)
        self.voicing.run()
        for stream, entries in resp or ():
            cid = keys.call_id_of(stream)
            oc = self.calls.get(cid)
            if oc is None:
                continue
            oc.last_entry = now
            for raw_id, fields in entries:
                eid = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                oc.read_from = eid
                t = fields.get(b"type")
                if t in (b"transcript", b"work.done", b"playout", b"platform.event"):
                    continue  # cheap skip of entries the core never uses
                try:
                    msg = decode(fields)
                except Exception:  # noqa: BLE001 (the worker dead-letters it)
                    continue
                cpu = time.thread_time()
                oc.pending += oc.core.handle(eid, msg)
                self.metrics.counters["decode_cpu_seconds_total"] += time.thread_time() - cpu
                oc.dirty = True
                if oc.core.ended:
                    break
            if time.monotonic() >= self._next_renew:
                self._renew()  # a long decode must not let the leases lapse
        for cid, oc in list(self.calls.items()):
            if oc.meta_ended and not oc.core.ended and now - oc.last_entry >= ORPHAN_QUIET_S:
                log.warning("call %s: record says ended and the stream is silent; ending", cid)
                oc.pending += oc.core.handle(oc.read_from, CallEnded(call_id=cid, reason="gateway_lost"))
                oc.dirty = True
        self._commit_many([oc for oc in self.calls.values()
                           if oc.pending or oc.core.ended
                           or (oc.dirty and now - oc.last_commit >= CHECKPOINT_EVERY_S)])

    # -------------------------------------------------------------- commits
    def _commit_many(self, ocs: list[OwnedCall]) -> list[bool]:
        if not ocs:
            return []
        pipe = self.r.pipeline(transaction=False)
        for oc in ocs:
            cid = oc.call.call_id
            args: list[Any] = [self.id, keys.CALL_STREAM_MAXLEN, json.dumps(oc.core.checkpoint()),
                               "1" if oc.core.ended else "0",
                               keys.CALL_KEY_TTL_AFTER_END if oc.core.ended else 0, len(oc.pending),
                               self.lease_ms, keys.TRANSCRIPT_MAXLEN]
            for t in oc.pending:
                f = encode(t)
                args += [len(f), "1" if t.final else "0"]
                for k, v in f.items():
                    args += [k, v]
            script_call(self._commit_script, [keys.call_asr_lease(cid), keys.call_stream(cid),
                                              keys.call_asr_checkpoint(cid), keys.call_transcript(cid)],
                        args, pipe)
        replies = pipe.execute(raise_on_error=False)
        ok = []
        after = self.r.pipeline(transaction=False)
        for oc, reply in zip(ocs, replies):
            cid = oc.call.call_id
            if isinstance(reply, Exception) and not isinstance(reply, redis.ResponseError):
                raise reply
            if isinstance(reply, redis.ResponseError):
                # e.g. OOM: nothing of this commit was written; the call is kept
                # (its output stays pending) and committed on a later turn.
                self.on_redis_error(reply)
                ok.append(False)
                continue
            if reply == -1:
                log.warning("call %s: asr commit refused (lease lost); dropping the call", cid)
                oc.core.close()
                self.calls.pop(cid, None)
                self.metrics.counters["commits_refused_total"] += 1
                ok.append(False)
                continue
            ok.append(True)
            self.metrics.count(oc.pending)
            for t in oc.pending:
                if t.segment > oc.last_segment:
                    oc.last_segment = t.segment
                    self.metrics.counters["segments_total"] += 1
                if t.final:
                    log.info("call %s: [%s #%d %d-%d ms] %r", cid, t.channel, t.segment,
                             t.start_ms, t.end_ms, t.text)
            oc.pending = []
            oc.dirty = False
            oc.last_commit = time.monotonic()
            if oc.core.ended:
                after.xack(keys.CALLS_STREAM, keys.TRANSCRIBERS_GROUP, oc.start_entry)
                self.calls.pop(cid, None)
                log.info("call %s: transcription done; released by %s", cid, self.id)
        if len(after):
            after.execute()
        for oc, good in zip(ocs, ok):
            if good and oc.core.ended:
                self.own.release(oc.call.call_id)
        return ok

    def hand_back_all(self) -> None:
        live = list(self.calls.values())
        done = self._commit_many(live)
        entries = []
        for oc, good in zip(live, done):
            oc.core.close()
            if good and not oc.core.ended:
                self.own.release(oc.call.call_id)
                entries.append(oc.start_entry)
        self.calls.clear()
        self.own.hand_back(entries)
        self.own.leave_group()
        log.info("transcriber %s stopped; handed back %d call(s)", self.id, len(entries))


# ------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piopiy-voice transcriber",
                                description="Speech recognition role: own calls, append transcripts.")
    p.add_argument("--id", help="consumer name / lease value (default: PV_TRANSCRIBER_ID or host-pid)")
    p.add_argument("--lease-ms", type=int, help="asr lease in ms (default: PV_TRANSCRIBER_LEASE_MS)")
    p.add_argument("--max-seconds", type=float, help="stop (gracefully) after this long")
    p.add_argument("--redis-url", help="Redis URL (default: REDIS_URL; required)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics and /healthz on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="bind address for --metrics-port")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        config = SpeechConfig.from_env()
        tid = args.id or config.transcriber_name()
        setup_logging("transcriber", level=settings.log_level, fmt=settings.log_format, instance=tid)
        url = resolve_redis_url(args.redis_url or settings.redis_url)
        lease_ms = args.lease_ms if args.lease_ms is not None else config.transcriber_lease_ms
        if lease_ms <= 100:
            raise SpeechError(f"--lease-ms must be > 100, got {lease_ms}")
        recognizer = make_recognizer(config.asr, **config.recognizer_opts())
        metrics = TranscriberMetrics()
        transcriber = Transcriber(connect(url), tid, lease_ms, recognizer, config, metrics)
    except (PiopiyError, ValueError) as exc:
        print(f"piopiy-voice transcriber: {exc}", file=sys.stderr)
        return 2
    log.info("transcriber %s: redis %s", tid, redact_url(url))
    return run_loop_role("transcriber", transcriber, lambda host, port: serve(metrics, host, port),
                         args.metrics_host, args.metrics_port, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
