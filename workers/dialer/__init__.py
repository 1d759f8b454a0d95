"""The dialer: an RQ queue of outbound calls, placed with a PCMO through ``RestClient``.

Where things live:

* ``api``       — ``CallRequest`` (validation), ``enqueue_call`` / ``enqueue_request``
                  (stable call ids, idempotency keys, scheduled calls);
* ``jobs``      — ``place_call``, the RQ job (at-most-once dialing, retries);
* ``worker``    — the RQ worker that runs the jobs: in its own process (default)
                  or a forked work-horse per job (``--fork``);
* ``clients``   — the settings, records' Redis and REST client, one per process;
* ``ratelimit`` — the shared calls-per-second limit and per-campaign live-call cap;
* ``campaign``  — CSV import and per-campaign state counts;
* ``cli``       — ``piopiy-voice dialer | call | campaign | status``.
"""

from .api import CallRequest, Enqueued, IdempotencyConflict, build_request, enqueue_call, enqueue_request

__all__ = ["CallRequest", "Enqueued", "IdempotencyConflict", "build_request", "enqueue_call", "enqueue_request"]
