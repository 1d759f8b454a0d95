"""Calls whose gateway died for good: found by their owner, which ends them.

A gateway that dies for good never sends its calls' ``call.ended``. Without
this check the owning worker would own (and renew) such a call for ever and
its record would stay ``live`` with no expiry. A call is an orphan when:

- its gateway's heartbeat key (``keys.gateway_heartbeat``) is gone;
- nothing new has reached the call's stream for ``GATEWAY_LOST_S`` (measured
  from the later of the last processed entry and the time the worker took the
  call), and every entry of the stream has been processed;
- no other gateway holds the call live (the record names another gateway when
  the platform reconnected elsewhere).

``find`` only looks; the runner ends what it returns (agent told
``CallEnded(reason="gateway_lost")``, record ``ended``, keys set to expire,
lease released, start entry ACKed).
"""

from __future__ import annotations

import time
from typing import Any

from piopiy_voice import keys

from .driver import id_ms

__all__ = ["GATEWAY_LOST_S", "find", "id_ms"]

#: A call whose gateway's heartbeat key is gone and whose stream has had no new
#: entry for this long is ended by its owner (the gateway died for good, so no
#: ``call.ended`` will ever come). Well above the gateway's heartbeat TTL (10 s).
GATEWAY_LOST_S = 30.0


def find(r: Any, calls: list[Any]) -> list[tuple[Any, bytes | None, bytes | None]]:
    """The orphans among ``calls`` (owned calls not yet ended, with ``call``,
    ``ckpt`` and ``since``), each as ``(owned call, record state, campaign)``
    (raw values of the call's record). Two pipelined round trips at most."""
    gws = sorted({oc.call.gateway_id for oc in calls})
    if not gws:
        return []
    pipe = r.pipeline(transaction=False)
    for gw in gws:
        pipe.exists(keys.gateway_heartbeat(gw))
    dead = {gw for gw, alive in zip(gws, pipe.execute()) if not alive}
    if not dead:
        return []
    now = time.time()
    suspects = [oc for oc in calls
                if oc.call.gateway_id in dead
                and now - max(oc.since, id_ms(oc.ckpt.last_id) / 1000.0) >= GATEWAY_LOST_S]
    if not suspects:
        return []
    pipe = r.pipeline(transaction=False)
    for oc in suspects:
        pipe.xrevrange(keys.call_stream(oc.call.call_id), count=1)
        pipe.hmget(keys.call_meta(oc.call.call_id), "state", "gateway_id", "campaign")
    replies = pipe.execute()
    found = []
    for i, oc in enumerate(suspects):
        last, (state, meta_gw, campaign) = replies[2 * i], replies[2 * i + 1]
        if last and last[0][0].decode() != oc.ckpt.last_id:
            continue  # entries still to process: the loop reads them first
        if state == b"live" and meta_gw is not None and meta_gw.decode() != oc.call.gateway_id:
            continue  # another gateway holds the call's socket now
        found.append((oc, state, campaign))
    return found
