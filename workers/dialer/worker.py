"""The RQ worker that runs dial jobs, in one of two modes.

Theory of operation
-------------------
RQ's default ``Worker`` forks a work-horse for every job: the child runs the
job and exits. Fork, a new connection to the queue's Redis in the child, new
clients of the records' Redis and of the platform: 44-52 ms of CPU per call
placed, ~19 calls/s per dialer at most (``bench/dialer_bench.py``), while the
dial itself (a few Redis round trips and one HTTP request) costs a few ms. So
the dialer runs jobs in its own process by default (9-12 ms per call):

* **in-process** (default, ``DialerWorker``, RQ's ``SimpleWorker``): one job
  at a time in the main thread, with the process's clients (``clients``).
  The job's timeout is still enforced: RQ's death penalty arms ``SIGALRM``
  around the job in the process that runs it, so a job stuck in a request,
  a sleep or a Redis call is interrupted, failed (``jobs``: ``outcome
  unknown`` if a request was in flight, never re-sent) and the dialer goes
  on with the next job. Cost of the mode: no crash isolation. A job that
  crashes the interpreter (a segfault, the OOM killer) takes the dialer with
  it, and one stuck in C code that never returns to Python cannot be
  interrupted; the call in flight is then failed ``outcome unknown`` by
  another dialer's stuck-dial sweep (``PV_DIAL_STUCK_AFTER_S``) and by RQ's
  abandoned-job clean-up, exactly as when a whole forking dialer dies.
* **forking** (``--fork``, RQ's ``Worker``): a work-horse per job, as RQ
  does by default. A horse that dies or hangs past the job timeout (+60 s) is
  killed and its call failed by ``jobs.on_horse_killed``; memory a job leaks
  dies with its horse. For users who run job code they do not trust to stay
  well-behaved, at the CPU cost above.

Either way a dialer runs one job at a time; dial rates scale with dialer
processes (each places calls back to back) up to the global rate limit
(``ratelimit``: one reservation schedule in Redis shared by every dialer).

The scheduler (calls with a ``start_at``) runs, as RQ runs it, in a process
forked from the dialer, which therefore holds a copy of the dialer's Redis
socket. RQ's scheduler outlived a dialer killed with SIGKILL (the OOM killer,
``kill -9``, a supervisor's last resort): the dead dialer's socket stayed
open in it, and with it the dialer's blocking ``BLMOVE`` on the queue, which
Redis then served with the next job pushed: that call sat in RQ's
intermediate list, never dialed, until RQ failed it a minute later as
"stuck" (found in the tests: the first of 60 calls never placed, every time
a killed dialer left its scheduler behind). So every process a dialer forks
asks the kernel to kill it the moment the dialer dies
(``tie_forked_children``, ``supervisor.die_with_parent``: Linux
``PR_SET_PDEATHSIG``), and the socket dies with the dialer. The scheduler's
lock then expires (a minute) before another dialer's scheduler takes over; a
``--fork`` work-horse dies mid-job like the dialer itself (its call is failed
``outcome_unknown`` by the stuck-dial sweep, never redialed).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rq import SimpleWorker, Worker

from piopiy_voice.supervisor import die_with_parent

from .jobs import on_horse_killed

log = logging.getLogger("piopiy_voice.dialer")


def tie_forked_children() -> None:
    """From now on every process this one forks (RQ's scheduler, ``--fork``'s
    work-horses) is SIGKILLed when this one dies (module docstring). Call it
    once, in the dialer process."""
    forker = [0]

    def before() -> None:
        forker[0] = os.getpid()

    def in_child() -> None:
        if not die_with_parent(forker[0]):
            log.warning("pid %d: cannot tie its life to the dialer's on this system; a dialer "
                        "killed with SIGKILL may leave it behind with its socket", os.getpid())

    os.register_at_fork(before=before, after_in_child=in_child)


class _OneTripHeartbeat:
    """RQ's worker heartbeat (three commands, sent one by one: three round
    trips, three times per job) sent as one pipeline: the same commands, one
    round trip. With RQ's other bookkeeping it was two thirds of the Redis
    round trips of a dial, the cost a dialer pays per call."""

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline)  # type: ignore[misc]
        with self.connection.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
            super().heartbeat(timeout, pipe)  # type: ignore[misc]
            pipe.execute()
        return None


class _StopNotSwallowed:
    """A stop signal is kept even where RQ's way of delivering it is lost.

    RQ stops an idle worker by raising ``StopRequested`` from its signal
    handler, in whatever the main thread is running at that moment, and a
    busy one by setting ``_stop_requested``, which its loop checks before
    each dequeue. ``StopRequested`` is an ``Exception``: any ``except
    Exception`` it lands in swallows it, and logging has one around every
    line it writes. Found in the tests: SIGTERM arrived while RQ logged a
    job's start (the worker not yet busy), logging printed "--- Logging
    error ---" and went on, and the dialer ran the job and then waited on
    the queue until it was killed. So the request is always recorded in
    ``_stop_requested`` as well: a swallowed stop still ends the dialer at
    its loop's next check, after the job at hand."""

    def _shutdown(self) -> None:
        self._stop_requested = True
        super()._shutdown()  # type: ignore[misc]


class DialerWorker(_StopNotSwallowed, _OneTripHeartbeat, SimpleWorker):
    """Runs each dial job in this process (see the module docstring).

    RQ logs three lines per job at INFO; the job logs its own outcome, so
    RQ's result-lifespan line is left out."""

    log_result_lifespan = False


class ForkingDialerWorker(_StopNotSwallowed, _OneTripHeartbeat, Worker):
    """Runs each dial job in a forked work-horse (``--fork``)."""

    log_result_lifespan = False


def make_worker(queues: list[Any], connection: Any, *, name: str | None = None,
                fork: bool = False) -> Worker | SimpleWorker:
    """The dialer's RQ worker: ``DialerWorker``, or ``ForkingDialerWorker``
    with ``jobs.on_horse_killed`` when ``fork``."""
    if fork:
        return ForkingDialerWorker(queues, connection=connection, name=name,
                                   work_horse_killed_handler=on_horse_killed)
    return DialerWorker(queues, connection=connection, name=name)
