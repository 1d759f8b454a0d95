"""Checkpoints: the agent's state and stream position, committed with its commands.

Theory of operation
-------------------
A call's checkpoint (hash ``keys.call_checkpoint(cid)``) says "every entry of
the call's stream up to ``last_id`` has been processed, the agent's state after
that is ``state``, and ``cmd_seq`` commands have been published".

Exactly-once commands: the commands produced by processing entries up to X and
the checkpoint at X are published by ONE Lua script (``commit``), which also
checks that the caller still holds the call's lease (fencing: a worker that
lost its lease, e.g. after a long stall, can publish nothing). So after a crash
either both the commands and the checkpoint exist, or neither: the next owner
resumes from the last checkpoint and, because agents are deterministic
functions of their events, re-derives exactly the unpublished commands. No
frame is processed into a second command, none is skipped.

Command ids are deterministic too (``<call_id>:<seq>``), so a gateway that
drops duplicate ``command_id`` gets a second, independent line of defence.

Deployment note: the script touches the call's keys (hash-tagged by call id)
AND the gateway's command stream, which lives in another slot. That is fine on
a single Redis, or a Sentinel-managed primary (``redis+sentinel://``, see
``piopiy_voice.redisconn``); on Redis Cluster it would need the command
stream hash-tagged per call, or the dedup-by-command_id path alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from piopiy_voice import keys
from piopiy_voice.contracts import encode

# KEYS: lease, checkpoint, command stream, calls stream
# ARGV: worker, lease_ms (renew), cmd maxlen, release (0/1), ckpt ttl s (0 none),
#       group, start entry id ("" none),
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
local i = 8
local n = tonumber(ARGV[i]); i = i + 1
local ck = {}
for j = 1, 2 * n do ck[j] = ARGV[i]; i = i + 1 end
local sent = 0
while i <= #ARGV do
  local m = tonumber(ARGV[i]); i = i + 1
  local f = {}
  for j = 1, 2 * m do f[j] = ARGV[i]; i = i + 1 end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(f))
  sent = sent + 1
end
if n > 0 then redis.call('HSET', KEYS[2], unpack(ck)) end
if tonumber(ARGV[5]) > 0 then
  redis.call('EXPIRE', KEYS[2], ARGV[5])
else
  redis.call('PERSIST', KEYS[2])  -- a call resumed after a done checkpoint
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  -- The lease and the start entry's idle time move together (ownership).
  if ARGV[7] ~= '' then redis.pcall('XCLAIM', KEYS[4], ARGV[6], ARGV[1], 0, ARGV[7], 'JUSTID') end
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
            state=json.loads(f["state"]) if f.get("state") else None,
            runtime=json.loads(f.get("runtime") or "{}"),
            done=f.get("done") == "1",
            owner=f.get("owner", ""),
            updated_at=float(f.get("updated_at", "0") or 0),
        )
    except (ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint of call {call_id!r} is corrupt: {exc}") from None


class Committer:
    """Publishes commands and the checkpoint atomically, fenced by the lease."""

    def __init__(self, r: Any, worker_id: str, lease_ms: int,
                 group: str = keys.WORKERS_GROUP) -> None:
        self.r = r
        self.worker_id = worker_id
        self.lease_ms = int(lease_ms)
        self.group = group
        self._script = r.register_script(_COMMIT_LUA)

    def commit(
        self,
        ckpt: Checkpoint,
        gateway_id: str,
        commands: Iterable[Any] = (),
        *,
        release: bool = False,
        ttl_s: int = 0,
        pipe: Any = None,
        start_entry: str = "",
    ) -> int | None:
        """Atomically: XADD ``commands`` to the gateway, HSET ``ckpt``, renew
        (or with ``release`` delete) the lease, refreshing the idle time of
        ``start_entry`` (the call's pending calls-stream entry). Returns the number of commands
        sent; raises ``LeaseLost`` if the lease is not ours (nothing written).
        With ``pipe`` the script is only queued (returns None): pass each raw
        reply of ``pipe.execute()`` to ``check``."""
        cid = ckpt.call_id
        flat = ckpt.fields(self.worker_id)
        args: list[Any] = [self.worker_id, self.lease_ms, keys.COMMAND_STREAM_MAXLEN,
                           "1" if release else "0", int(ttl_s), self.group, start_entry or "",
                           len(flat)]
        for k, v in flat.items():
            args += [k, v]
        for cmd in commands:
            f = encode(cmd)
            args.append(len(f))
            for k, v in f.items():
                args += [k, v]
        sent = self._script(
            keys=[keys.call_lease(cid), keys.call_checkpoint(cid), keys.gateway_commands(gateway_id),
                  keys.CALLS_STREAM],
            args=args, client=pipe,
        )
        if pipe is not None:
            return None
        return self.check(cid, sent)

    @staticmethod
    def check(call_id: str, reply: Any) -> int:
        if isinstance(reply, Exception):
            raise reply
        if int(reply) < 0:
            raise LeaseLost(call_id)
        return int(reply)
