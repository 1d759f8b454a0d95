"""The HTTP API role (``piopiy-voice api``): list, listen to and steer live calls,
place outbound calls, answer inbound ones, serve the supervisor console.

It is its own process and reads and writes Redis only: it never talks to a
gateway directly, so it cannot slow the calls' hot path, and it scales by
running more replicas behind a load balancer (no state is shared between
replicas; each keeps one reader per listened call of its own).

Modules, one concept each:

* ``config``   — the role's settings (``PV_API_*``, ``PV_ANSWER_*``).
* ``auth``     — API keys (hashed in Redis, scoped) and signed, expiring URLs.
* ``calls``    — the call list and one call's record, timeline and transcript.
* ``control``  — a control body -> a command; deliver it, wait for the result.
* ``listen``   — the live audio and events of a call, fanned out to listeners.
* ``inbound``  — the answer URL the platform POSTs inbound calls to.
* ``metrics``  — the role's Prometheus counters.
* ``openapi``  — the OpenAPI document (kept true by a test).
* ``app``      — the Starlette application wiring the above to routes.
* ``server``   — ``main(argv)``: serve (uvicorn) or manage keys.
"""

from .app import create_app
from .config import ApiSettings

__all__ = ["ApiSettings", "create_app"]
