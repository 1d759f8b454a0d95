"""The Starlette application: routes -> the modules of this package.

Every handler is a thin shell: authenticate, parse (bounded), call the pure
or Redis-reading function, answer JSON. Errors are JSON ``{"error":
{"status", "reason", "field"?}}`` with a status that says whose fault it is:
401/403 credentials, 404 unknown call, 409 call not live / key conflict, 410
ended, 413 body too large, 422 malformed body, 503/504 Redis or gateway slow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from piopiy_voice import keys
from piopiy_voice.errors import PiopiyConfigError, PiopiyValidationError, load_json
from piopiy_voice.gateway.control import CallNotFound, CallNotLive, CommandTimeout, send_async
from piopiy_voice.redisconn import connect, connect_async
from piopiy_voice.settings import Settings

from . import auth, calls, control, inbound, metrics
from .config import ApiSettings
from .listen import ListenService
from .openapi import openapi_document

log = logging.getLogger(__name__)

SSE_INTERVAL_S = 1.0
REDIS_MAX_CONNECTIONS = 2000
SSE_PING_S = 15.0


class HttpError(Exception):
    def __init__(self, status: int, reason: str, label: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.label, self.field = status, reason, label, field


def _error(status: int, reason: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"status": status, "reason": reason}
    if field:
        body["field"] = field
    headers = {"WWW-Authenticate": 'Bearer realm="piopiy-voice"'} if status == 401 else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def endpoint(route: str) -> Callable:
    """Wrap a handler: map our exceptions to JSON errors, count every answer."""
    def wrap(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            try:
                resp = await fn(request)
            except auth.Refusal as exc:
                resp = _error(exc.status, exc.reason)
            except HttpError as exc:
                metrics.BAD_REQUESTS.labels(reason=exc.label).inc()
                resp = _error(exc.status, exc.reason, exc.field)
            except PiopiyValidationError as exc:
                metrics.BAD_REQUESTS.labels(reason="invalid").inc()
                resp = _error(422, str(exc), exc.field)
            except (TimeoutError, ConnectionError, OSError) as exc:
                log.warning("%s %s: backend unavailable: %r", request.method, route, exc)
                resp = _error(503, f"backend unavailable: {type(exc).__name__}")
            metrics.HTTP_REQUESTS.labels(method=request.method, route=route,
                                         status=str(resp.status_code)).inc()
            return resp
        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler
    return wrap


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "bad Content-Length", "bad_length")
        if int(declared) > limit:
            raise HttpError(413, f"body larger than {limit} bytes", "too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HttpError(413, f"body larger than {limit} bytes", "too_large")
    if not data:
        raise HttpError(422, "body must be JSON", "empty", "body")
    return load_json(bytes(data), "body")


class Api:
    """The state of one API process: clients, settings, the listen service."""

    def __init__(self, settings: Settings, api: ApiSettings, redis_url: str | None = None) -> None:
        self.settings = settings
        self.api = api
        self.redis_url = redis_url or settings.redis_url
        self.ar: Any = None
        self.r: Any = None
        self.listen: ListenService | None = None
        self.started = time.time()

    async def start(self) -> None:
        # A blocking pool: a burst of requests waits for a connection instead of
        # failing; each listened call's reader holds one while it blocks.
        self.ar = connect_async(self.redis_url, blocking_pool=True, max_connections=REDIS_MAX_CONNECTIONS)
        self.r = connect(self.redis_url)
        self.listen = ListenService(self.ar, queue=self.api.listen_queue,
                                    max_stall_s=self.api.listen_max_stall_s,
                                    max_listeners=self.api.max_listeners)

    async def stop(self) -> None:
        if self.listen:
            await self.listen.close()
        if self.ar is not None:
            await self.ar.aclose()
        if self.r is not None:
            self.r.close()

    # ------------------------------------------------------------ auth
    async def principal(self, headers: Any, query: Any, call_id: str | None = None) -> auth.Principal:
        token = auth.bearer_token(headers.get("authorization"))
        if token is not None:
            return await auth.principal_for_key(self.ar, token)
        if call_id is not None and "sig" in query:
            return auth.verify_params(self.settings.signing_secret, call_id, dict(query))
        raise auth.refuse(401, "no credentials: send 'Authorization: Bearer <api key>' "
                               "or use a signed URL", "missing")

    async def require(self, request: Request, scope: str, call_id: str | None = None) -> auth.Principal:
        principal = await self.principal(request.headers, request.query_params, call_id)
        principal.require(scope, call_id)
        return principal

    def call_urls(self, call_id: str, principal: auth.Principal) -> dict[str, Any]:
        base = self.api.base_url()
        ttl = self.api.url_ttl_s
        out: dict[str, Any] = {}
        if "listen" in principal.scopes:
            q = auth.sign_params(self.settings.signing_secret, "listen", call_id, ttl)
            ws_base = "ws" + base[4:] if base.startswith("http") else base
            out["listen_url"] = f"{ws_base}/calls/{call_id}/listen?{urlencode(q)}"
            out["urls_expire_at"] = int(q["exp"])
        if "control" in principal.scopes:
            q = auth.sign_params(self.settings.signing_secret, "control", call_id, ttl)
            out["control_url"] = f"{base}/calls/{call_id}/control?{urlencode(q)}"
            out["urls_expire_at"] = int(q["exp"])
        return out


def _call_id(request: Request | WebSocket) -> str:
    cid = request.path_params["call_id"]
    try:
        return keys.validate_call_id(cid)
    except ValueError as exc:
        raise HttpError(404, f"no such call: {exc}", "bad_call_id", "call_id") from None


def create_app(settings: Settings | None = None, api_settings: ApiSettings | None = None,
               redis_url: str | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    api_settings = api_settings or ApiSettings.from_env()
    state = Api(settings, api_settings, redis_url)

    # --------------------------------------------------------- public routes
    async def healthz(request: Request) -> Response:
        try:
            async with asyncio.timeout(1.0):
                await state.ar.ping()
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"status": "redis unavailable", "error": repr(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "listeners": state.listen.listener_count,
                             "hubs": len(state.listen.hubs)})

    async def metrics_page(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    def _asset(name: str, media: str) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            text = resources.files("piopiy_voice.api").joinpath("console", name).read_bytes()
            return Response(text, media_type=media, headers={"Cache-Control": "no-cache"})
        serve.__name__ = f"console_{name.replace('.', '_')}"
        return serve

    async def root(request: Request) -> Response:
        return RedirectResponse("/console")

    # ------------------------------------------------------------- calls
    @endpoint("/calls")
    async def list_calls(request: Request) -> Response:
        await state.require(request, "read")
        st = request.query_params.get("state")
        if st is not None and st not in ("queued", "dialing", "placed", "failed", "live", "ended"):
            raise HttpError(422, f"state: unknown state {st!r}", "invalid", "state")
        rows = await calls.list_calls(state.ar, agent_talking=state.listen.agent_talking, state=st)
        return JSONResponse({"calls": rows, "now": time.time()})

    @endpoint("/calls/events")
    async def call_events(request: Request) -> Response:
        await state.require(request, "read")
        await state.listen.track_gateways()

        async def stream():
            last = None
            quiet = 0.0
            yield "retry: 2000\n\n"
            while True:
                try:
                    rows = await calls.list_calls(state.ar, agent_talking=state.listen.agent_talking)
                except Exception as exc:  # noqa: BLE001 - say so, keep the stream
                    yield f"event: error\ndata: {json.dumps({'reason': repr(exc)})}\n\n"
                    await asyncio.sleep(SSE_INTERVAL_S)
                    continue
                snapshot = json.dumps(rows)
                if snapshot != last:
                    last = snapshot
                    quiet = 0.0
                    body = json.dumps({"calls": rows, "now": time.time()})
                    yield f"event: calls\ndata: {body}\n\n"
                else:
                    quiet += SSE_INTERVAL_S
                    if quiet >= SSE_PING_S:
                        quiet = 0.0
                        yield ": ping\n\n"
                await asyncio.sleep(SSE_INTERVAL_S)
                await state.listen.track_gateways()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @endpoint("/calls")
    async def place_call(request: Request) -> Response:
        principal = await state.require(request, "dial")
        body = await read_json(request, state.api.max_body_bytes)
        if not isinstance(body, dict):
            raise PiopiyValidationError("body", "must be a JSON object of call options")
        header_key = request.headers.get("idempotency-key")
        if header_key and "idempotency_key" not in body:
            body["idempotency_key"] = header_key
        from piopiy_voice.workers.dialer.api import IdempotencyConflict, enqueue_call  # noqa: PLC0415

        options = dict(body)
        to = options.pop("to", None)
        caller_id = options.pop("caller_id", None)
        try:
            res = await asyncio.to_thread(enqueue_call, state.r, to=to, caller_id=caller_id,
                                          settings=state.settings, **options)
        except IdempotencyConflict as exc:
            raise HttpError(409, str(exc), "idempotency_conflict", "idempotency_key") from None
        except PiopiyConfigError as exc:  # a cluster REDIS_URL and no PV_QUEUE_REDIS_URL
            raise HttpError(503, str(exc), "dial_unconfigured") from None
        except TypeError as exc:  # an option name Python refused (e.g. not a string)
            raise PiopiyValidationError("body", str(exc)) from None
        async with state.ar.pipeline(transaction=False) as pipe:
            calls.index_call(pipe, res.call_id)
            await pipe.execute()
        out = {"call_id": res.call_id, "job_id": res.job_id, "created": res.created,
               "start_at": res.start_at.isoformat() if res.start_at else None,
               **state.call_urls(res.call_id, principal)}
        return JSONResponse(out, status_code=201 if res.created else 200)

    @endpoint("/calls/{call_id}")
    async def get_call(request: Request) -> Response:
        cid = _call_id(request)
        principal = await state.require(request, "read", cid)
        record = await calls.read_record(state.ar, cid)
        if not record:
            raise HttpError(404, f"call {cid!r} is unknown (or expired)", "unknown_call", "call_id")
        timeline = await calls.read_timeline(state.ar, cid)
        transcript = await calls.read_transcript(state.ar, cid)
        row = calls.summarize(cid, record, time.time(),
                              calls.talking_label(False, state.listen.agent_talking(cid)))
        return JSONResponse({"call": row, "record": record, "timeline": timeline,
                             "transcript": transcript, **state.call_urls(cid, principal)})

    @endpoint("/calls/{call_id}/control")
    async def control_call(request: Request) -> Response:
        cid = _call_id(request)
        principal = await state.require(request, "control", cid)
        body = await read_json(request, state.api.max_body_bytes)
        cmd = control.parse_control(body, cid, default_caller_id=state.settings.piopiy_caller_id,
                                    supervisor_number=state.api.supervisor_number or None,
                                    issued_by=f"api:{principal.key_id or 'signed-url'}")
        action = body["action"].replace("-", "_")
        try:
            result = await send_async(state.ar, cmd, state.api.control_timeout_s)
        except CallNotLive as exc:
            status = 410 if exc.state == "ended" else 409
            raise HttpError(status, str(exc), "not_live", "call_id") from None
        except CallNotFound as exc:
            raise HttpError(404, str(exc), "unknown_call", "call_id") from None
        except CommandTimeout as exc:
            metrics.CONTROL_RESULTS.labels(action=action, status="timeout").inc()
            return _error(504, str(exc))
        metrics.CONTROL_RESULTS.labels(action=action, status=result.status).inc()
        body_out = {"status": result.status, "reason": result.reason, "command": result.command,
                    "command_id": result.command_id, "gateway_id": result.gateway_id}
        return JSONResponse(body_out, status_code=200 if result.status == "applied" else 409)

    # ------------------------------------------------------------- listen
    async def listen_ws(ws: WebSocket) -> None:
        async def deny(status: int, reason: str) -> None:
            if "websocket.http.response" in ws.scope.get("extensions", {}):
                await ws.send_denial_response(_error(status, reason))
            else:
                await ws.close(code=4000 + status, reason=reason[:120])

        try:
            cid = _call_id(ws)
            principal = await state.principal(ws.headers, ws.query_params, cid)
            principal.require("listen", cid)
            record = await calls.read_record(state.ar, cid)
        except auth.Refusal as exc:
            await deny(exc.status, exc.reason)
            return
        except HttpError as exc:
            metrics.BAD_REQUESTS.labels(reason=exc.label).inc()
            await deny(exc.status, exc.reason)
            return
        except (TimeoutError, ConnectionError, OSError) as exc:
            await deny(503, f"backend unavailable: {type(exc).__name__}")
            return
        state_ = record.get("state")
        if not record:
            metrics.BAD_REQUESTS.labels(reason="unknown_call").inc()
            await deny(404, f"call {cid!r} is unknown (or expired)")
            return
        if state_ == "ended" or state_ == "failed":
            metrics.BAD_REQUESTS.labels(reason="not_live").inc()
            await deny(410, f"call {cid!r} has {state_}")
            return
        if state_ != "live":
            metrics.BAD_REQUESTS.labels(reason="not_live").inc()
            await deny(409, f"call {cid!r} is not live yet (state {state_})")
            return
        if state.listen.listener_count >= state.api.max_listeners:
            metrics.LISTEN_DROPPED.labels(reason="capacity").inc()
            await deny(503, "too many listeners on this API process")
            return
        await ws.accept()
        await state.listen.listen(ws, cid, record)

    # ------------------------------------------------------------- inbound
    @endpoint("/answer")
    async def answer(request: Request) -> Response:
        t0 = time.monotonic()
        client = request.client.host if request.client else None
        inbound.check_caller(state.api, client, request.query_params.get("token"),
                             request.headers.get("authorization"))
        event = inbound.parse_inbound(await read_json(request, 16 * 1024))
        cid = inbound.inbound_call_id(event["cmiuuid"])
        pcmo = inbound.answer_pcmo(state.settings, state.api, cid)
        write = asyncio.get_running_loop().create_task(
            asyncio.wait_for(inbound.record_inbound(state.ar, cid, event, state.api), 10.0))
        try:
            await asyncio.wait_for(asyncio.shield(write), state.api.answer_redis_timeout_s)
            outcome = "answered"
        except TimeoutError:
            outcome = "answered_redis_slow"
            log.warning("inbound %s: Redis slower than %.2fs; answered anyway (record written later)",
                        cid, state.api.answer_redis_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the caller is ringing: answer regardless
            outcome = "answered_redis_error"
            log.warning("inbound %s: record not written (%r); answered anyway", cid, exc)
        metrics.ANSWERS.labels(outcome=outcome).inc()
        metrics.ANSWER_SECONDS.observe(time.monotonic() - t0)
        return JSONResponse(pcmo, headers={"X-Call-Id": cid})

    routes = [
        Route("/", root, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/console", _asset("index.html", "text/html; charset=utf-8"), methods=["GET"]),
        Route("/console/app.js", _asset("app.js", "text/javascript; charset=utf-8"), methods=["GET"]),
        Route("/console/app.css", _asset("app.css", "text/css; charset=utf-8"), methods=["GET"]),
        Route("/calls", list_calls, methods=["GET"]),
        Route("/calls", place_call, methods=["POST"]),
        Route("/calls/events", call_events, methods=["GET"]),
        Route("/calls/{call_id}", get_call, methods=["GET"]),
        Route("/calls/{call_id}/control", control_call, methods=["POST"]),
        WebSocketRoute("/calls/{call_id}/listen", listen_ws),
        Route("/answer", answer, methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.api = state
    return app
