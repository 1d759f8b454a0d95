"""``piopiy-voice dialer | call | campaign | status``.

Exit codes: 0 ok, 1 not found / partial failure, 2 bad input or configuration
(``REDIS_URL`` not set, bad settings). Bad input is reported in one line naming
the option or field, never as a traceback or a pydantic dump.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from datetime import datetime, timezone
from typing import Any, Callable

from piopiy_voice import callrecord, keys
from piopiy_voice.errors import PiopiyConfigError, PiopiyValidationError, load_json
from piopiy_voice.observability import setup_logging
from piopiy_voice.redisconn import connect, redact_url, resolve_redis_url
from piopiy_voice.settings import Settings

log = logging.getLogger("piopiy_voice.dialer")

#: Furthest ``--in`` accepted: a year (a schedule beyond is a typo, and
#: ``inf`` / ``nan`` are not times at all).
MAX_START_DELAY_S = 366 * 24 * 3600.0


def _config_errors_exit_2(prog: str) -> Callable:
    """A missing REDIS_URL or bad settings: one line on stderr, exit 2."""

    def wrap(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        @functools.wraps(fn)
        def run(argv: list[str]) -> int:
            try:
                return fn(argv)
            except PiopiyConfigError as exc:
                print(f"piopiy-voice {prog}: {exc}", file=sys.stderr)
                return 2

        return run

    return wrap


def _settings() -> Settings:
    return Settings.from_env()


def _redis():
    return connect(resolve_redis_url())


# -- dialer worker ---------------------------------------------------------------


@_config_errors_exit_2("dialer")
def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="piopiy-voice dialer",
                                description="Run an RQ worker (with scheduler) that places queued calls.")
    p.add_argument("--queue", help="queue name (default PV_DIAL_QUEUE)")
    p.add_argument("--name", help="worker name (default: RQ's)")
    p.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    p.add_argument("--fork", action="store_true",
                   help="run every job in a forked work-horse (crash isolation, ~5x the CPU per "
                        "call); default: jobs run in this process, job timeouts still enforced")
    args = p.parse_args(argv)
    settings = _settings()
    setup_logging("dialer", level=settings.log_level, fmt=settings.log_format)
    if settings.using_dev_secret and settings.gateway_public_url.startswith("wss://"):
        # A public (wss://) deployment signing with the published secret: anyone
        # could forge stream URLs. Refuse rather than warn.
        print("piopiy-voice dialer: PV_SIGNING_SECRET is the published development default "
              f"while PV_GATEWAY_PUBLIC_URL is {settings.gateway_public_url}: set a secret of "
              "your own (e.g. `openssl rand -hex 32`)", file=sys.stderr)
        return 2
    from rq import Queue

    url = resolve_redis_url(settings.redis_url)  # production role: REDIS_URL or exit 2
    # RQ runs on the queue's Redis (PV_QUEUE_REDIS_URL: required beside a
    # Redis Cluster, refused with one line by ``queue_url`` otherwise).
    queue_url = settings.queue_url() or url
    conn = connect(queue_url, socket_timeout=settings.redis_socket_timeout_s)
    queue = Queue(args.queue or settings.dial_queue, connection=conn)
    if settings.using_dev_secret:
        log.warning("PV_SIGNING_SECRET is the development default: stream URLs are forgeable")
    log.info("dialer on queue %s (redis %s, call records on %s): %.2f calls/s, %d live calls per "
             "campaign, REST %s, jobs %s", queue.name, redact_url(queue_url), redact_url(url),
             settings.dial_rate_per_s, settings.campaign_max_live, redact_url(settings.piopiy_base_url),
             "in forked work-horses" if args.fork else "in this process")
    from .clients import start_process
    from .worker import make_worker, tie_forked_children

    start_process(settings)  # the jobs' settings, and the forked horses'
    _start_sweeper(url, settings, queue if queue_url != url else None)
    tie_forked_children()   # RQ's scheduler and horses die with this process
    worker = make_worker([queue], conn, name=args.name, fork=args.fork)
    worker.work(burst=args.burst, with_scheduler=True, logging_level=settings.log_level.upper())
    return 0


def _start_sweeper(url: str, settings: Settings, apart_queue: Any = None) -> None:
    """Every dialer marks calls stuck in ``dialing`` (a dialer died mid-request)
    as failed, outcome unknown (``jobs.sweep_stuck``); with the dial queue on a
    Redis of its own (``apart_queue``) it also finishes enqueues that died
    between their record and their job (``api.sweep_unfinished_enqueues``)."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    from .api import sweep_unfinished_enqueues  # noqa: PLC0415
    from .jobs import sweep_stuck  # noqa: PLC0415

    every = max(1.0, min(15.0, settings.dial_stuck_after_s / 4))

    def loop() -> None:
        conn = connect(url, socket_timeout=settings.redis_socket_timeout_s)
        while True:
            try:
                sweep_stuck(conn, settings.dial_stuck_after_s)
                if apart_queue is not None:
                    sweep_unfinished_enqueues(conn, apart_queue, settings.dial_stuck_after_s)
            except Exception as exc:  # noqa: BLE001 (never kill the dialer for a sweep)
                log.warning("stuck-dial sweep failed: %s", exc)
            time.sleep(every)

    threading.Thread(target=loop, name="dial-sweeper", daemon=True).start()


# -- enqueueing ------------------------------------------------------------------


def _when(args) -> datetime | None:
    if args.at and args.in_s is not None:
        raise ValueError("start_at: give --at or --in, not both")
    if args.at:
        return args.at
    if args.in_s is not None:
        if not math.isfinite(args.in_s) or not 0 <= args.in_s <= MAX_START_DELAY_S:
            raise PiopiyValidationError(
                "--in", f"must be a number of seconds from 0 to {MAX_START_DELAY_S:.0f} (a year), got {args.in_s}")
        from .api import in_seconds

        return in_seconds(args.in_s)
    return None


def _add_call_options(p: argparse.ArgumentParser, *, per_call: bool) -> None:
    p.add_argument("--caller-id", help="Piopiy number to call from (default PIOPIY_CALLER_ID)")
    p.add_argument("--flow", help="agent flow the gateway/workers run for this call")
    p.add_argument("--listen-mode", choices=("caller", "callee", "both"))
    p.add_argument("--voice-quality", type=int, choices=(8000, 16000, 32000))
    p.add_argument("--no-stream-on-answer", dest="stream_on_answer", action="store_false", default=None,
                   help="start streaming before the call is answered")
    p.add_argument("--duration", type=int, help="max call seconds (default 5400)")
    p.add_argument("--loop", type=int, help="bridge loop (needs a bridge in --then)")
    p.add_argument("--timeout", type=int, help="bridge ring timeout (needs a bridge in --then)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra_params entry (repeatable)")
    p.add_argument("--then", dest="then_json", metavar="JSON",
                   help='PCMO actions after the stream, e.g. \'[{"action":"hangup"}]\'')
    p.add_argument("--then-play", metavar="FILE", help="play FILE after the stream")
    p.add_argument("--then-hangup", action="store_true", help="hang up after the stream")
    p.add_argument("--at", type=_iso, help="start time, ISO 8601 with timezone")
    p.add_argument("--in", dest="in_s", type=float, metavar="SECONDS", help="start in SECONDS")
    p.add_argument("--max-attempts", type=int, help="attempts on retryable failures (default 5)")
    if per_call:
        p.add_argument("--to", required=True, help="number to call, country code first")
        p.add_argument("--campaign", help="campaign name (counts and live-call cap)")
        p.add_argument("--key", dest="idempotency_key", help="idempotency key: same key, one call")


def _iso(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a timezone (e.g. {text}Z or {text}+05:30)")
    return value


def _options(args) -> dict[str, Any]:
    extra: list[dict[str, Any]] = []
    if args.then_json:
        parsed = load_json(args.then_json, "--then")
        extra += parsed if isinstance(parsed, list) else [parsed]
    if args.then_play:
        from piopiy_voice.pcmo import Action

        extra += Action().playMusic(args.then_play).PCMO()
    if args.then_hangup:
        extra.append({"action": "hangup"})
    params = {}
    for item in args.param:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--param must be KEY=VALUE, got {item!r}")
        params[k] = v
    return dict(
        caller_id=args.caller_id, flow=args.flow, listen_mode=args.listen_mode,
        voice_quality=args.voice_quality, stream_on_answer=args.stream_on_answer,
        duration=args.duration, loop=args.loop, timeout=args.timeout,
        extra_params=params or None, extra_actions=extra or None,
        start_at=_when(args), max_attempts=args.max_attempts,
    )


def _retry_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="piopiy-voice call retry",
                                description="Queue a new attempt of a failed call (new call id, "
                                            "linked to the old one); prints the new call id.")
    p.add_argument("call_id")
    p.add_argument("--force", action="store_true",
                   help="also retry a call whose outcome is unknown (the person may have been rung)")
    args = p.parse_args(argv)
    settings = _settings()
    from .api import RedisFull
    from .retry import RetryRefused, retry_call

    try:
        result = retry_call(_redis(), args.call_id, force=args.force, settings=settings)
    except (RetryRefused, RedisFull) as exc:
        print(f"piopiy-voice call retry: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"piopiy-voice call retry: {exc}", file=sys.stderr)
        return 2
    print(result.call_id)
    if not result.created:
        print(f"(already retried as {result.call_id}: nothing new queued)", file=sys.stderr)
    return 0


@_config_errors_exit_2("call")
def call_main(argv: list[str]) -> int:
    if argv[:1] == ["retry"]:
        return _retry_main(argv[1:])
    p = argparse.ArgumentParser(prog="piopiy-voice call",
                                description="Enqueue one outbound call; prints its call id.")
    _add_call_options(p, per_call=True)
    args = p.parse_args(argv)
    settings = _settings()
    from .api import build_request, enqueue_request

    try:
        opts = _options(args)
        request = build_request(settings, to=args.to, campaign=args.campaign,
                                idempotency_key=args.idempotency_key, **opts)
    except ValueError as exc:
        print(f"piopiy-voice call: {exc}", file=sys.stderr)
        return 2
    from .api import RedisFull

    try:
        result = enqueue_request(_redis(), request, settings=settings)
    except ValueError as exc:  # IdempotencyConflict
        print(f"piopiy-voice call: {exc}", file=sys.stderr)
        return 2
    except RedisFull as exc:
        print(f"piopiy-voice call: {exc}", file=sys.stderr)
        return 1
    print(result.call_id)
    if not result.created:
        print(f"(already enqueued under key {args.idempotency_key!r}: nothing new queued)", file=sys.stderr)
    elif result.start_at:
        print(f"scheduled for {result.start_at.isoformat()}", file=sys.stderr)
    return 0


def _lookup(prog: str, fetch, missing: str, *, as_json: bool) -> tuple[Any, int]:
    """``fetch()`` for a status command: ``(result, 0)``, printed as JSON when
    ``as_json``; ``(None, 2)`` on bad input, ``(None, 1)`` when not found (the
    reason on stderr)."""
    try:
        found = fetch()
    except ValueError as exc:
        print(f"piopiy-voice {prog}: {exc}", file=sys.stderr)
        return None, 2
    if found is None:
        print(f"piopiy-voice {prog}: {missing}", file=sys.stderr)
        return None, 1
    if as_json:
        import json  # noqa: PLC0415

        print(json.dumps(found))
    return found, 0


# -- campaigns ---------------------------------------------------------------------


class _Bar:
    """A plain text progress bar on stderr (redrawn in place on a terminal,
    one line per 10 % otherwise so logs stay readable)."""

    def __init__(self, stream=sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} rows {frac:4.0%}"
        if self.tty:
            self.stream.write("\r" + line)
            if done >= total:
                self.stream.write("\n")
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            self.stream.write(line + "\n")
        self.stream.flush()


@_config_errors_exit_2("campaign")
def campaign_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="piopiy-voice campaign", description="Enqueue a CSV of contacts / show progress.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pe = sub.add_parser("enqueue", help="enqueue every good row of a CSV file as a call")
    pe.add_argument("file", help="CSV with a header; needs a 'to' column (columns: README, 'Using it')")
    pe.add_argument("--name", required=True, help="campaign name ([A-Za-z0-9_.:-], max 64)")
    pe.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_call_options(pe, per_call=False)
    ps = sub.add_parser("status", help="counts of the campaign's calls by state")
    ps.add_argument("name")
    ps.add_argument("--json", action="store_true")
    pr = sub.add_parser("retry", help="queue a new attempt of every failed call that did not ring")
    pr.add_argument("name")
    pr.add_argument("--force", action="store_true",
                    help="also retry calls whose outcome is unknown (the person may have been rung)")
    args = p.parse_args(argv)
    settings = _settings()
    from .campaign import campaign_status, enqueue_csv

    if args.cmd == "retry":
        from .retry import retry_campaign

        try:
            rep = retry_campaign(_redis(), args.name, force=args.force, settings=settings)
        except ValueError as exc:
            print(f"piopiy-voice campaign: {exc}", file=sys.stderr)
            return 2
        for cid, why in sorted(rep.skipped.items()):
            print(f"  skipped {cid}: {why}", file=sys.stderr)
        print(f"campaign {args.name}: {len(rep.retried)} failed call(s) queued again, "
              f"{len(rep.skipped)} skipped")
        return 0

    if args.cmd == "status":
        status, rc = _lookup("campaign", lambda: campaign_status(_redis(), args.name),
                             f"no campaign named {args.name!r}", as_json=args.json)
        if status is not None and not args.json:
            print(f"campaign {status['campaign']}: {status['total']} calls, "
                  f"{status['live_slots']} live slots in use")
            for state, n in status["states"].items():
                print(f"  {state:<8} {n}")
        return rc

    try:
        defaults = {k: v for k, v in _options(args).items() if v is not None}
        report = enqueue_csv(_redis(), args.file, args.name, defaults=defaults, settings=settings,
                             progress=None if args.quiet else _Bar())
    except (OSError, ValueError) as exc:
        print(f"piopiy-voice campaign: {exc}", file=sys.stderr)
        return 2
    for err in report.errors:
        print(f"{args.file}:{err}", file=sys.stderr)
    print(f"campaign {args.name}: {report.rows} rows, {report.enqueued} enqueued, "
          f"{report.already} already enqueued, {len(report.errors)} bad")
    return 1 if report.errors else 0


# -- status ------------------------------------------------------------------------


def _fmt_t(t: str) -> str:
    try:
        return datetime.fromtimestamp(float(t), timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    except ValueError:
        return t


def call_status(conn, call_id: str) -> dict[str, Any] | None:
    """The call record and its timeline (oldest first); None if unknown."""
    keys.validate_call_id(call_id)
    meta = callrecord.decode_record(conn.hgetall(keys.call_meta(call_id)))
    entries = conn.xrange(keys.call_timeline(call_id))
    if not meta and not entries:
        return None
    timeline = [callrecord.decode_record(fields) for _, fields in entries]
    if meta.get("queued_at") and not any(e.get("event") == "state.queued" for e in timeline):
        # Queuing writes no timeline line (a stream costs ~4.7 KB): shown from the record.
        timeline.insert(0, {"event": "state.queued", "t": meta["queued_at"]})
    job = None
    if meta.get("job_id"):
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        from .api import queue_connection  # noqa: PLC0415

        try:
            # The job is on the queue's Redis (PV_QUEUE_REDIS_URL beside a cluster).
            j = Job.fetch(meta["job_id"], connection=queue_connection(conn, Settings.from_env()))
            status = j.get_status()  # a JobStatus enum: show "finished", not "JobStatus.FINISHED"
            job = {"id": j.id, "status": getattr(status, "value", status), "origin": j.origin}
        except NoSuchJobError:
            job = {"id": meta["job_id"], "status": "expired"}
        except PiopiyConfigError as exc:  # a cluster REDIS_URL and no PV_QUEUE_REDIS_URL
            job = {"id": meta["job_id"], "status": f"unknown ({exc})"}
    return {"call_id": call_id, "record": meta, "timeline": timeline, "job": job,
            "transcript": call_transcript(conn, call_id)}


def call_transcript(conn, call_id: str, batch: int = 500) -> list[dict[str, Any]]:
    """The call's final transcript segments (``keys.call_transcript``), oldest
    first: time (entry id's ms), channel, segment, call-audio ms, text."""
    out: list[dict[str, Any]] = []
    start = "-"
    while True:  # bounded: the stream is capped (keys.TRANSCRIPT_MAXLEN)
        entries = conn.xrange(keys.call_transcript(call_id), start, "+", count=batch)
        for eid, t in callrecord.transcript_finals(entries):
            out.append({"t": keys.entry_ms(eid) / 1000, "channel": t.channel, "segment": t.segment,
                        "start_ms": t.start_ms, "end_ms": t.end_ms, "text": t.text})
        if len(entries) < batch:
            return out
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)


@_config_errors_exit_2("status")
def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="piopiy-voice status", description="Show the whole life of one call.")
    p.add_argument("call_id")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:  # cheap (one sorted-set range): a dead dialer's stuck calls say so here too
        from .jobs import sweep_stuck  # noqa: PLC0415

        sweep_stuck(_redis(), _settings().dial_stuck_after_s)
    except Exception as exc:  # noqa: BLE001 (status must still show what there is)
        log.debug("stuck-dial sweep skipped: %s", exc)
    status, rc = _lookup("status", lambda: call_status(_redis(), args.call_id),
                         f"no call {args.call_id!r} (unknown or expired)", as_json=args.json)
    if status is None or args.json:
        return rc
    rec = status["record"]
    print(f"call {args.call_id}: {rec.get('state', '?')}")
    width = max((len(k) for k in rec), default=0)
    for k in sorted(rec):
        v = _fmt_t(rec[k]) if k.endswith("_at") and k != "start_at" else rec[k]
        print(f"  {k:<{width}}  {v}")
    if status["job"]:
        print(f"  {'rq job':<{width}}  {status['job']['id']} ({status['job']['status']})")
    print("timeline:")
    for entry in status["timeline"]:
        t = _fmt_t(entry.pop("t", ""))
        event = entry.pop("event", "?")
        detail = " ".join(f"{k}={v}" for k, v in entry.items())
        print(f"  {t}  {event:<16} {detail}")
    if status["transcript"]:
        print("transcript:")
        for line in status["transcript"]:
            print(f"  {_fmt_t(str(line['t']))}  {line['channel']:<12} {line['text']}")
    return 0
