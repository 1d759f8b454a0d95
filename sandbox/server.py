"""``piopiy-voice sandbox``: the local Piopiy emulator (REST + calls).

Two threads: a stdlib ``ThreadingHTTPServer`` answers REST, and one asyncio
loop runs every call (:class:`piopiy_voice.sandbox.platform.SandboxCall`). The HTTP side
only validates and hands work to the loop with ``run_coroutine_threadsafe``.

Platform endpoints (same bodies and codes as the real ones; the table is in
``sandbox/README.md``):

* ``POST /v2/ind_pcmo_make_call`` (``from`` must be an Indian Piopiy number,
  ``^91[6789]\\d{9}$``) and ``POST /v2/global_pcmo_make_call``.
  Replies 200 ``{"code":200,"status":"progress","request_id":..,"data":{..}}``;
  420 bad appid/secret; 422 missing or invalid property (``field`` names it);
  404 unknown music ``file_name`` (see ``MediaLibrary``); 400 body not JSON.
  The HTTP status equals the body's ``code``. The ``request_id`` is also the
  call's ``cmiuuid``.
* ``POST /v1/call/action`` ``{"appid","secret","cmiuuid","action"}`` with
  action hangup | hold | unhold | holdToggle; 404 unknown or ended call.

Sandbox-only endpoints (for tests and the demo):

* ``GET /sandbox/calls`` -> ``{"calls": [{request_id, status, end_reason}]}``
* ``GET /sandbox/calls/<id>[?wait=SECONDS]`` -> the call's report (waits up
  to SECONDS, max 600, for the call to finish and its report to be written).
* ``POST /sandbox/faults`` ``{"code": 502, "count": 1}`` -> the next ``count``
  make-call requests are refused with ``code`` (to test client retries).
* ``POST /sandbox/inbound`` ``{"answer_url", "from", "to", "scenario", "headers"}``
  -> a person calls in: the sandbox POSTs ``{"action":"inbound","from","to",
  "time","cmiuuid"}`` to ``answer_url`` (as the platform does), runs the PCMO
  list of the reply (its ``stream`` dialed like an outbound call's) and answers
  ``{"request_id", "answer_status", "pcmo"}``; 502 when the answer URL refuses,
  fails or returns no valid PCMO.
* ``GET /healthz``.

``extra_params.scenario`` picks the scripted caller of a call (bundled name or
path); otherwise the sandbox's default scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from piopiy_voice.errors import PiopiyValidationError
from piopiy_voice.observability import setup_logging
from piopiy_voice.pcmo_models import Play, PlayGetInput, check_number, parse_pcmo
from piopiy_voice.settings import Settings

from .platform import MediaLibrary, PlatformOptions, SandboxCall
from .report import load_report
from .scenario import Scenario, ScenarioError, load_scenario

log = logging.getLogger(__name__)

DEV_APP_ID = "1111111"
DEV_APP_TOKEN = "sandbox-dev-token"
INDIAN_NUMBER = re.compile(r"^91[6789]\d{9}$")
MAX_BODY = 1024 * 1024
#: Finished calls kept in memory; older ones are answered from their timeline.json.
KEEP_FINISHED = 500
CALL_ACTIONS = ("hangup", "hold", "unhold", "holdToggle")
#: How long the platform waits for the app's answer URL (s).
ANSWER_TIMEOUT_S = 5.0


class ApiError(Exception):
    def __init__(self, code: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field

    def body(self) -> dict[str, Any]:
        out = {"code": self.code, "status": "error", "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


@dataclass
class _CallEntry:
    call: SandboxCall
    done: threading.Event = field(default_factory=threading.Event)


class Sandbox:
    """The emulator, startable in-process: ``url = Sandbox(...).start()`` ... ``stop()``."""

    def __init__(self, *, app_id: str | int = DEV_APP_ID, app_token: str = DEV_APP_TOKEN,
                 host: str = "127.0.0.1", port: int = 0, report_dir: str | Path = "reports",
                 scenario: str | Scenario = "demo", options: PlatformOptions | None = None) -> None:
        if not str(app_id).strip() or not app_token:
            raise ValueError("app_id and app_token must not be empty")
        self.app_id, self.app_token = str(app_id).strip(), app_token
        self.host, self.port = host, port
        self.report_dir = Path(report_dir)
        self.default_scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        self.options = options or PlatformOptions()
        self.media = MediaLibrary(self.options)
        self._calls: dict[str, _CallEntry] = {}
        self._lock = threading.Lock()
        self._faults: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self.base_url: str | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> str:
        """Start the loop and the HTTP server; returns the base URL (``http://host:port``)."""
        if self.base_url:
            return self.base_url
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run_loop() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._loop_thread = threading.Thread(target=run_loop, name="sandbox-loop", daemon=True)
        self._loop_thread.start()
        ready.wait(5)
        handler = type("Handler", (_Handler,), {"sandbox": self})
        self._http = ThreadingHTTPServer((self.host, self.port), handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="sandbox-http",
                                             kwargs={"poll_interval": 0.2}, daemon=True)
        self._http_thread.start()
        self.base_url = f"http://{self.host}:{self.port}"
        log.info("sandbox listening on %s (reports in %s)", self.base_url, self.report_dir)
        return self.base_url

    def stop(self, timeout: float = 10.0) -> None:
        """Hang up live calls (their reports are written), then stop both threads."""
        if self._http:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._loop and self._loop.is_running():
            for entry in list(self._calls.values()):
                if not entry.done.is_set():
                    self._loop.call_soon_threadsafe(entry.call.end, "sandbox_shutdown")
            for entry in list(self._calls.values()):
                entry.done.wait(timeout)
            try:
                asyncio.run_coroutine_threadsafe(_cancel_leftovers(), self._loop).result(timeout)
            except Exception:  # noqa: BLE001 - shutting down regardless
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread:
                self._loop_thread.join(timeout)
            self._loop.close()
        self._loop = None
        self.base_url = None

    def __enter__(self) -> "Sandbox":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- Python API --------------------------------------------------------------

    def calls(self) -> list[dict[str, Any]]:
        with self._lock:
            entries = list(self._calls.values())
        return [{"request_id": e.call.request_id, "status": e.call.state,
                 "end_reason": e.call.end_reason, "finished": e.done.is_set()} for e in entries]

    def report(self, request_id: str, wait: float | None = None) -> dict[str, Any]:
        """The call's report; with ``wait``, first wait up to that many seconds for it to finish.

        Raises ``KeyError`` for an unknown request id. A call from an earlier
        sandbox run is read from its ``timeline.json``.
        """
        with self._lock:
            entry = self._calls.get(request_id)
        if entry is None:
            try:
                return load_report(self.report_dir, request_id)
            except (FileNotFoundError, ValueError):
                raise KeyError(request_id) from None
        if wait:
            entry.done.wait(min(float(wait), 600.0))
        if entry.done.is_set() or self._loop is None:
            return entry.call.report()
        fut = asyncio.run_coroutine_threadsafe(_snapshot(entry.call), self._loop)
        try:
            return fut.result(5)
        except FutureTimeout:
            return entry.call.report()

    def wait(self, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the call has finished (report written); returns its report."""
        report = self.report(request_id, wait=timeout)
        if not report.get("finished"):
            raise TimeoutError(f"call {request_id} still {report.get('status')} after {timeout}s")
        return report

    def inject_fault(self, code: int, count: int = 1) -> None:
        if code not in (404, 420, 422, 500, 502, 503) or count < 1:
            raise ValueError("code must be one of 404, 420, 422, 500, 502, 503 and count >= 1")
        with self._lock:
            self._faults.extend([code] * count)

    # -- REST behaviour (called from HTTP threads) --------------------------------

    def make_call(self, endpoint: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(422, "body must be a JSON object", "body")
        self._check_auth(body)
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
        if fault:
            raise ApiError(fault, f"injected sandbox fault {fault}")
        for name in ("from", "to", "pcmo"):
            if name not in body or body[name] in (None, ""):
                raise ApiError(422, f"missing property: {name}", name)
        try:
            from_ = check_number(body["from"], "from")
            to = check_number(body["to"], "to")
        except PiopiyValidationError as exc:
            raise ApiError(422, str(exc), exc.field) from None
        if endpoint == "ind" and not INDIAN_NUMBER.match(str(from_)):
            raise ApiError(422, f"from: {from_} is not an Indian Piopiy number (use the global endpoint)",
                           "from")
        duration = body.get("duration", 5400)
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 1 <= duration <= 86400:
            raise ApiError(422, f"duration: must be a number of seconds in 1..86400, got {duration!r}",
                           "duration")
        extra = body.get("extra_params") or {}
        if not isinstance(extra, dict):
            raise ApiError(422, "extra_params: must be an object", "extra_params")
        try:
            pcmo = parse_pcmo(body["pcmo"])
        except PiopiyValidationError as exc:
            raise ApiError(422, str(exc), exc.field) from None
        for index, act in enumerate(pcmo):
            name = getattr(act, "file_name", None) if isinstance(act, (Play, PlayGetInput)) else None
            if name and not self.media.known(name):
                raise ApiError(404, f"pcmo[{index}].file_name: music file {name!r} not found",
                               f"pcmo[{index}].file_name")
        scenario = self.default_scenario
        if extra.get("scenario") is not None:
            try:
                scenario = load_scenario(str(extra["scenario"]))
            except ScenarioError as exc:
                raise ApiError(422, f"extra_params.scenario: {exc}", "extra_params.scenario") from None
        if self._loop is None:
            raise ApiError(502, "sandbox is not running")
        request_id = str(uuid.uuid4())
        self._start_call(request_id, from_=from_, to=to, duration_s=float(duration), pcmo=pcmo,
                         scenario=scenario, extra_params=extra, endpoint=endpoint)
        return {"code": 200, "status": "progress", "request_id": request_id,
                "data": {"status": "progress", "request_id": request_id}}

    def _start_call(self, request_id: str, *, from_: Any, to: Any, duration_s: float, pcmo: list[Any],
                    scenario: Scenario, extra_params: dict[str, Any], endpoint: str,
                    direction: str = "outbound") -> SandboxCall:
        call = SandboxCall(request_id, from_=from_, to=to, duration_s=duration_s, pcmo=pcmo,
                           scenario=scenario, report_dir=self.report_dir, options=self.options,
                           extra_params=extra_params, endpoint=endpoint, direction=direction)
        entry = _CallEntry(call)
        with self._lock:
            self._calls[request_id] = entry
            finished = [k for k, e in self._calls.items() if e.done.is_set()]
            for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
                del self._calls[key]
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(call.run(), self._loop)
        def on_done(f) -> None:
            exc = None if f.cancelled() else f.exception()
            if exc is not None or f.cancelled():
                log.error("call %s crashed: %r", request_id, exc)
                call.end_reason = call.end_reason or "sandbox_error"
                call.state, call.finished = "ended", True
            entry.done.set()

        fut.add_done_callback(on_done)
        log.info("call %s placed (%s): %s -> %s, scenario %s", request_id, direction, from_, to,
                 scenario.name)
        return call

    def place_inbound(self, answer_url: str, *, from_: Any = "919812345678", to: Any = "919000000000",
                      scenario: str | None = None, timeout_s: float = ANSWER_TIMEOUT_S,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
        """A person calls the app's Piopiy number: POST the inbound event to the app's
        answer URL, then run the PCMO list of the reply (its ``stream`` is dialed like
        an outbound call's). Returns ``{"request_id", "answer_status", "pcmo"}``.

        Raises ``ApiError`` 422 for bad arguments, 502 when the answer URL fails,
        refuses, times out or replies with something that is not a valid PCMO list.
        """
        if not isinstance(answer_url, str) or urlsplit(answer_url).scheme not in ("http", "https"):
            raise ApiError(422, f"answer_url: must be an http(s) URL, got {answer_url!r}", "answer_url")
        try:
            from_n = check_number(from_, "from")
            to_n = check_number(to, "to")
        except PiopiyValidationError as exc:
            raise ApiError(422, str(exc), exc.field) from None
        chosen = self.default_scenario
        if scenario is not None:
            try:
                chosen = load_scenario(str(scenario))
            except ScenarioError as exc:
                raise ApiError(422, f"scenario: {exc}", "scenario") from None
        if self._loop is None:
            raise ApiError(502, "sandbox is not running")
        request_id = str(uuid.uuid4())
        event = {"action": "inbound", "from": from_n, "to": to_n,
                 "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cmiuuid": request_id}
        req = urllib.request.Request(answer_url, data=json.dumps(event).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                status, raw = resp.status, resp.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode("utf-8", "replace")
            raise ApiError(502, f"answer URL refused the call: HTTP {exc.code} {detail}") from None
        except OSError as exc:
            raise ApiError(502, f"answer URL unreachable: {exc}") from None
        if len(raw) > MAX_BODY:
            raise ApiError(502, f"answer URL replied with more than {MAX_BODY} bytes")
        try:
            pcmo = parse_pcmo(json.loads(raw))
        except (ValueError, PiopiyValidationError) as exc:
            raise ApiError(502, f"answer URL replied with no valid PCMO list: {exc}") from None
        call = self._start_call(request_id, from_=from_n, to=to_n, duration_s=5400.0, pcmo=pcmo,
                                scenario=chosen, extra_params={}, endpoint="inbound",
                                direction="inbound")
        call.event("api", "answer_url", url=answer_url.split("?")[0], status=status)
        return {"code": 200, "status": "progress", "request_id": request_id, "answer_status": status,
                "pcmo": [a.to_dict() for a in pcmo]}

    def call_action(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(422, "body must be a JSON object", "body")
        self._check_auth(body)
        for name in ("cmiuuid", "action"):
            if not body.get(name):
                raise ApiError(422, f"missing property: {name}", name)
        action = body["action"]
        if action not in CALL_ACTIONS:
            raise ApiError(422, f"action: must be one of {'|'.join(CALL_ACTIONS)}, got {action!r}", "action")
        with self._lock:
            entry = self._calls.get(str(body["cmiuuid"]))
        if entry is None or entry.call.ended:
            raise ApiError(404, f"cmiuuid: no live call {body['cmiuuid']!r}", "cmiuuid")
        assert self._loop is not None
        self._loop.call_soon_threadsafe(entry.call.api_action, action)
        return {"code": 200, "status": "success", "cmiuuid": body["cmiuuid"], "action": action}

    def _check_auth(self, body: dict[str, Any]) -> None:
        for name in ("appid", "secret"):
            if body.get(name) in (None, ""):
                raise ApiError(422, f"missing property: {name}", name)
        if str(body["appid"]).strip() != self.app_id or body["secret"] != self.app_token:
            raise ApiError(420, "authentication failed: appid/secret do not match")


async def _cancel_leftovers() -> None:
    """Cancel whatever tasks are left (e.g. a socket's keepalive) so the loop closes clean."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _snapshot(call: SandboxCall) -> dict[str, Any]:
    return call.report()


class _Handler(BaseHTTPRequestHandler):
    sandbox: Sandbox
    protocol_version = "HTTP/1.1"
    server_version = "piopiy-sandbox"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http %s " + fmt, self.address_string(), *args)

    def _reply(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, default=str).encode()
        self.send_response(code, {420: "Authentication Failed", 422: "Unprocessable Entity"}.get(code))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise ApiError(413, f"body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}", "body") from None

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path.rstrip("/")
        try:
            body = self._body()
            if path == "/v2/ind_pcmo_make_call":
                self._reply(200, self.sandbox.make_call("ind", body))
            elif path == "/v2/global_pcmo_make_call":
                self._reply(200, self.sandbox.make_call("global", body))
            elif path == "/v1/call/action":
                self._reply(200, self.sandbox.call_action(body))
            elif path == "/sandbox/inbound":
                if not isinstance(body, dict) or not body.get("answer_url"):
                    raise ApiError(422, "missing property: answer_url", "answer_url")
                headers = body.get("headers") or {}
                if not isinstance(headers, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
                    raise ApiError(422, "headers: must be an object of strings", "headers")
                self._reply(200, self.sandbox.place_inbound(
                    body["answer_url"], from_=body.get("from", "919812345678"),
                    to=body.get("to", "919000000000"), scenario=body.get("scenario"),
                    headers=headers))
            elif path == "/sandbox/faults":
                if not isinstance(body, dict):
                    raise ApiError(422, "body must be a JSON object", "body")
                try:
                    self.sandbox.inject_fault(int(body.get("code", 502)), int(body.get("count", 1)))
                except (TypeError, ValueError) as exc:
                    raise ApiError(422, str(exc), "code") from None
                self._reply(200, {"code": 200, "status": "ok"})
            else:
                raise ApiError(404, f"no such endpoint: POST {path}")
        except ApiError as exc:
            self._reply(exc.code, exc.body())
        except Exception as exc:  # noqa: BLE001 - never drop a request without an answer
            log.exception("sandbox request failed")
            self._reply(502, {"code": 502, "status": "error", "message": f"sandbox error: {exc}"})

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/")
        query = parse_qs(parts.query)
        try:
            if path == "/healthz":
                self._reply(200, {"code": 200, "status": "ok"})
            elif path == "/sandbox/calls":
                self._reply(200, {"code": 200, "calls": self.sandbox.calls()})
            elif path.startswith("/sandbox/calls/"):
                request_id = path.rsplit("/", 1)[1]
                wait = None
                if "wait" in query:
                    try:
                        wait = max(0.0, min(600.0, float(query["wait"][0])))
                    except ValueError:
                        raise ApiError(422, "wait: must be a number of seconds", "wait") from None
                try:
                    self._reply(200, self.sandbox.report(request_id, wait=wait))
                except KeyError:
                    raise ApiError(404, f"no call {request_id!r}", "request_id") from None
            else:
                raise ApiError(404, f"no such endpoint: GET {path}")
        except ApiError as exc:
            self._reply(exc.code, exc.body())


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="piopiy-voice sandbox",
                                     description="Local Piopiy emulator: REST endpoints + scripted callers.")
    parser.add_argument("--host", default=settings.sandbox_host)
    parser.add_argument("--port", type=int, default=settings.sandbox_port)
    parser.add_argument("--app-id", default=settings.piopiy_app_id,
                        help="accepted appid (default PIOPIY_APP_ID, else a dev id)")
    parser.add_argument("--app-token", default=settings.piopiy_app_token,
                        help="accepted secret (default PIOPIY_APP_TOKEN, else a dev token)")
    parser.add_argument("--scenario", default="demo",
                        help="default scenario: bundled name or path (calls may pick another "
                             "with extra_params.scenario)")
    parser.add_argument("--report-dir", default=settings.sandbox_report_dir)
    parser.add_argument("--ring-ms", type=int, default=PlatformOptions.ring_ms)
    parser.add_argument("--media-dir", action="append", default=[],
                        help="extra folder of audio files known to play (repeatable)")
    parser.add_argument("--strict-media", action="store_true",
                        help="only files in media folders exist; other file_name values get 404")
    parser.add_argument("--text-events", action="store_true",
                        help="also send JSON text events (start/dtmf/stop) on the media socket")
    args = parser.parse_args(argv)
    setup_logging("sandbox", level=settings.log_level, fmt=settings.log_format)
    app_id, app_token = args.app_id, args.app_token
    if app_id in (None, "") or not app_token:
        app_id, app_token = DEV_APP_ID, DEV_APP_TOKEN
        log.warning("PIOPIY_APP_ID/PIOPIY_APP_TOKEN not set: accepting the dev pair appid=%s secret=%s",
                    app_id, app_token)
    if args.ring_ms < 0:
        parser.error("--ring-ms must be >= 0")
    options = PlatformOptions()
    options = replace(options, ring_ms=args.ring_ms, strict_media=args.strict_media,
                      text_events=args.text_events,
                      media_dirs=(*options.media_dirs, *map(Path, args.media_dir)))
    try:
        sandbox = Sandbox(app_id=app_id, app_token=app_token, host=args.host, port=args.port,
                          report_dir=args.report_dir, scenario=args.scenario, options=options)
    except ScenarioError as exc:
        print(f"piopiy-voice sandbox: {exc}", file=sys.stderr)
        return 2
    try:
        url = sandbox.start()
    except OSError as exc:
        print(f"piopiy-voice sandbox: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"sandbox ready at {url} (reports in {Path(args.report_dir).resolve()})", flush=True)
    stop = threading.Event()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
    return 0
