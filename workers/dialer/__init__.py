"""The dialer: an RQ queue of outbound calls, placed with a PCMO through ``RestClient``.

Where things live:

* ``api``       — ``CallRequest`` (validation), ``enqueue_call`` / ``enqueue_request``
                  (stable call ids, idempotency keys, scheduled calls);
* ``jobs``      — ``place_call``, the RQ job (at-most-once dialing, retries);
* ``ratelimit`` — the shared calls-per-second limit and per-campaign live-call cap;
* ``campaign``  — CSV import and per-campaign state counts;
* ``cli``       — ``piopiy-voice dialer | call | campaign | status``.
"""

from .api import CallRequest, Enqueued, IdempotencyConflict, build_request, enqueue_call, enqueue_request

__all__ = ["CallRequest", "Enqueued", "IdempotencyConflict", "build_request", "enqueue_call", "enqueue_request"]
