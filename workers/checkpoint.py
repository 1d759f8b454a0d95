"""Checkpoints: the agent's state and stream position, committed with its commands.

Theory of operation
-------------------
A call's checkpoint (hash ``keys.call_checkpoint(cid)``) says "every entry of
the call's stream up to ``last_id`` has been processed, the agent's state after
that is ``state``, and ``cmd_seq`` commands have been published".

Exactly-once decisions, at-least-once delivery, deduplicated (the
transactional outbox). The commands produced by processing entries up to X
and the checkpoint at X are written by ONE Lua script (``commit``) into keys
of the call's own hash slot: the checkpoint hash, the lease (renewed) and the
call's OUTBOX stream (``keys.call_outbox``), which receives the commands. The
script first checks that the caller still holds the call's lease (fencing: a
worker that lost its lease, e.g. after a long stall, can commit nothing). So
after a crash either both the commands and the checkpoint exist, or neither:
the next owner resumes from the last checkpoint and, because agents are
deterministic functions of their events, re-derives exactly the uncommitted
commands. No frame is processed into a second command, none is skipped.

Delivery is the second step: once the commit is acknowledged, the worker
XADDs the committed commands to the gateway's command stream
(``keys.gateway_commands``, another slot, on Redis Cluster maybe another
node), and records in its next checkpoint how far delivery is confirmed
(``sent_seq``). Each commit trims the outbox to the commands after
``sent_seq``, so it holds at most the last turn's commands (or, while the
gateway's node is unreachable, those not yet delivered: the worker keeps
retrying them in order, before any later command of the call). A new owner
delivers again whatever the outbox holds. A command can thus reach the
gateway twice (a crash after delivery, before the next checkpoint; or a
stalled old owner delivering late): command ids are deterministic
(``<call_id>:<seq>``) and the gateway drops a ``command_id`` it has applied
(``piopiy_voice.gateway.dispatch``).

Every script touches one slot, so this is the same code on a single Redis,
a Sentinel-managed primary and Redis Cluster. The cost against the former
single script (commands XADDed straight to the gateway's stream): one more
pipelined round trip per turn that has commands, and each command written
twice (outbox, then the gateway's stream); see BENCHMARKS.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from piopiy_voice import keys
from piopiy_voice.contracts import encode
from piopiy_voice.redisconn import script_call

# KEYS: lease, checkpoint, outbox
# ARGV: worker, lease_ms (renew), release (0/1), ckpt ttl s (0 none),
#       outbox entries to keep (commands not yet confirmed delivered, these included),
#       n checkpoint fields (pairs), pairs..., then per command: n fields (pairs), pairs...
# The lease is ours, or missing while the checkpoint is missing or still ours
# (Redis restarted empty, or a stall nobody took the call over during: see
# ``piopiy_voice.workers.ownership``): then it is taken again.
_COMMIT_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then
  if cur then return -1 end
  local owner = redis.call('HGET', KEYS[2], 'owner')
  if owner and owner ~= ARGV[1] then return -1 end
end
local i = 6
local n = tonumber(ARGV[i]); i = i + 1
local ck = {}
for j = 1, 2 * n do ck[j] = ARGV[i]; i = i + 1 end
local sent = 0
while i <= #ARGV do
  local m = tonumber(ARGV[i]); i = i + 1
  local f = {}
  for j = 1, 2 * m do f[j] = ARGV[i]; i = i + 1 end
  redis.call('XADD', KEYS[3], '*', unpack(f))
  sent = sent + 1
end
local keep = tonumber(ARGV[5])
if keep > 0 then
  if sent > 0 or redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('XTRIM', KEYS[3], 'MAXLEN', keep)
  end
else
  redis.call('DEL', KEYS[3])
end
if n > 0 then redis.call('HSET', KEYS[2], unpack(ck)) end
if tonumber(ARGV[4]) > 0 then
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  if keep > 0 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
else
  redis.call('PERSIST', KEYS[2])  -- a call resumed after a done checkpoint
end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return sent
"""


class LeaseLost(Exception):
    """The commit was refused: this worker no longer holds the call's lease."""


@dataclass
class Checkpoint:
    """What a worker needs to carry a call on (see the module docstring)."""

    call_id: str
    last_id: str = "0-0"
    cmd_seq: int = 0
    #: Commands up to this seq were seen on the gateway's command stream;
    #: those after it are in the outbox (see the module docstring).
    sent_seq: int = 0
    state: dict[str, Any] | None = None
    #: Runtime bookkeeping: last seq per entry type (dedup), counters.
    runtime: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    owner: str = ""
    updated_at: float = 0.0

    def fields(self, worker_id: str) -> dict[str, str]:
        return {
            "last_id": self.last_id,
            "cmd_seq": str(self.cmd_seq),
            "sent_seq": str(self.sent_seq),
            "state": json.dumps(self.state, separators=(",", ":")),
            "runtime": json.dumps(self.runtime, separators=(",", ":")),
            "done": "1" if self.done else "0",
            "owner": worker_id,
            "updated_at": f"{time.time():.3f}",
        }


def load(r: Any, call_id: str) -> Checkpoint | None:
    """The call's checkpoint, or None when no worker has committed one yet."""
    raw = r.hgetall(keys.call_checkpoint(call_id))
    if not raw:
        return None
    f = {k.decode(): v.decode() for k, v in raw.items()}
    try:
        return Checkpoint(
            call_id=call_id,
            last_id=f.get("last_id", "0-0"),
            cmd_seq=int(f.get("cmd_seq", "0")),
            sent_seq=int(f.get("sent_seq", f.get("cmd_seq", "0"))),
            state=json.loads(f["state"]) if f.get("state") else None,
            runtime=json.loads(f.get("runtime") or "{}"),
            done=f.get("done") == "1",
            owner=f.get("owner", ""),
            updated_at=float(f.get("updated_at", "0") or 0),
        )
    except (ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint of call {call_id!r} is corrupt: {exc}") from None


def undelivered(r: Any, ckpt: Checkpoint) -> list[dict]:
    """The committed commands a previous owner may not have delivered (the
    outbox after ``ckpt.sent_seq``), as raw field maps in order."""
    out = []
    for _eid, fields in r.xrange(keys.call_outbox(ckpt.call_id)):
        seq = int(fields.get(b"seq", b"0"))
        if ckpt.sent_seq < seq <= ckpt.cmd_seq:
            out.append(fields)
    return out


class Committer:
    """Commits commands and the checkpoint atomically (fenced by the lease),
    then delivers the commands to the gateway (see the module docstring)."""

    def __init__(self, r: Any, worker_id: str, lease_ms: int) -> None:
        self.r = r
        self.worker_id = worker_id
        self.lease_ms = int(lease_ms)
        self._script = r.register_script(_COMMIT_LUA)

    def commit(
        self,
        ckpt: Checkpoint,
        commands: Iterable[Any] = (),
        *,
        release: bool = False,
        ttl_s: int = 0,
        pipe: Any = None,
    ) -> int | None:
        """Atomically: append ``commands`` to the call's outbox (trimmed to the
        commands after ``ckpt.sent_seq``), HSET ``ckpt``, renew (or with
        ``release`` delete) the lease. Returns the number of commands
        committed; raises ``LeaseLost`` if the lease is not ours (nothing
        written). With ``pipe`` the script is only queued (returns None): pass
        each raw reply of ``pipe.execute()`` to ``check``."""
        cid = ckpt.call_id
        flat = ckpt.fields(self.worker_id)
        args: list[Any] = [self.worker_id, self.lease_ms, "1" if release else "0", int(ttl_s),
                           max(0, ckpt.cmd_seq - ckpt.sent_seq), len(flat)]
        for k, v in flat.items():
            args += [k, v]
        for cmd in commands:
            f = encode(cmd)
            args.append(len(f))
            for k, v in f.items():
                args += [k, v]
        sent = script_call(self._script,
                           [keys.call_lease(cid), keys.call_checkpoint(cid), keys.call_outbox(cid)],
                           args, pipe)
        if pipe is not None:
            return None
        return self.check(cid, sent)

    @staticmethod
    def deliver(pipe: Any, gateway_id: str, commands: Iterable[Any]) -> int:
        """Queue the XADD of committed ``commands`` (models or raw field maps,
        in order) to the gateway's command stream on ``pipe``; returns how many."""
        n = 0
        for cmd in commands:
            pipe.xadd(keys.gateway_commands(gateway_id), cmd if isinstance(cmd, dict) else encode(cmd),
                      maxlen=keys.COMMAND_STREAM_MAXLEN, approximate=True)
            n += 1
        return n

    @staticmethod
    def check(call_id: str, reply: Any) -> int:
        if isinstance(reply, Exception):
            raise reply
        if int(reply) < 0:
            raise LeaseLost(call_id)
        return int(reply)
