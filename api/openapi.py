"""The OpenAPI 3.1 document of the API role, written by hand (the routes are
few and their contracts matter more than generated boilerplate). A test checks
that every route of the app is here and every path here is a route.

The listen WebSocket is described as the GET it starts with (OpenAPI has no
WebSocket object), marked ``x-websocket: true``, with its message layout.
"""

from __future__ import annotations

from typing import Any

from .auth import SCOPES
from .control import ACTIONS


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_CALL_ID = {"name": "call_id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}}
_SIGNED = [{"name": n, "in": "query", "required": False, "schema": {"type": "string"},
            "description": "signed URL parameter (instead of a bearer key)"} for n in ("scope", "exp", "sig")]
_AUTH_ERRORS = {"401": _err("no valid credential"), "403": _err("credential lacks the scope")}


def _sec(scope: str, signed: bool = False) -> list[dict[str, list[str]]]:
    sec = [{"bearer": [scope]}]
    if signed:
        sec.append({"signedUrl": [scope]})
    return sec


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "piopiy-voice API", "version": "1",
                 "description": "List, listen to and steer live calls; place outbound calls; "
                                "answer inbound calls; the supervisor console."},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": f"API key (pvk_…) with scopes: {', '.join(SCOPES)}"},
                "signedUrl": {"type": "apiKey", "in": "query", "name": "sig",
                              "description": "scope, exp, sig query parameters of a signed call URL"},
                "platform": {"type": "apiKey", "in": "query", "name": "token",
                             "description": "PV_ANSWER_TOKEN (or HTTP Basic password), or an allowed source IP"},
            },
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "status": {"type": "integer"}, "reason": {"type": "string"}, "field": {"type": "string"}},
                    "required": ["status", "reason"]}}},
                "CallRow": {"type": "object", "properties": {
                    "call_id": {"type": "string"}, "state": {"type": "string"},
                    "direction": {"type": "string", "enum": ["outbound", "inbound"]},
                    "rate": {"type": ["integer", "null"]}, "mode": {"type": ["string", "null"]},
                    "owner": {"type": ["string", "null"]}, "gateway": {"type": ["string", "null"]},
                    "duration_s": {"type": ["number", "null"]},
                    "talking": {"type": ["string", "null"], "enum": ["caller", "agent", "both", "none", None]},
                    "to": {"type": ["string", "null"]}, "from": {"type": ["string", "null"]},
                    "end_reason": {"type": ["string", "null"]}}},
                "CallUrls": {"type": "object", "properties": {
                    "listen_url": {"type": "string"}, "control_url": {"type": "string"},
                    "urls_expire_at": {"type": "integer"}}},
                "Control": {"type": "object", "required": ["action"], "properties": {
                    "action": {"type": "string", "enum": list(ACTIONS)},
                    "file": {"type": "string"}, "text": {"type": "string", "maxLength": 2000},
                    "to": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                           "description": "number(s), or 'supervisor'"},
                    "caller_id": {"type": "string"}, "ring_type": {"type": "string"},
                    "pcmo": {"type": "array", "items": {"type": "object"}}}},
                "ControlResult": {"type": "object", "properties": {
                    "status": {"type": "string", "enum": ["applied", "rejected"]},
                    "reason": {"type": "string"}, "command": {"type": "string"},
                    "command_id": {"type": "string"}, "gateway_id": {"type": "string"}}},
            },
        },
        "paths": {
            "/": {"get": {"summary": "redirect to the console", "responses": {"307": {"description": "to /console"}}}},
            "/healthz": {"get": {"summary": "liveness and Redis reachability",
                                 "responses": {"200": {"description": "ok"}, "503": {"description": "Redis away"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "JSON"}}}},
            "/console": {"get": {"summary": "the supervisor console (HTML)", "responses": {"200": {"description": "page"}}}},
            "/console/app.js": {"get": {"summary": "console script", "responses": {"200": {"description": "JS"}}}},
            "/console/app.css": {"get": {"summary": "console style", "responses": {"200": {"description": "CSS"}}}},
            "/calls": {
                "get": {"summary": "live and recent calls", "security": _sec("read"),
                        "parameters": [{"name": "state", "in": "query", "schema": {"type": "string"}}],
                        "responses": {"200": {"description": "calls", "content": {"application/json": {"schema": {
                            "type": "object", "properties": {"calls": {"type": "array", "items": {
                                "$ref": "#/components/schemas/CallRow"}}}}}}}, **_AUTH_ERRORS}},
                "post": {"summary": "place an outbound call (the CLI's options and validation)",
                         "security": _sec("dial"),
                         "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}],
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "required": ["to"], "description":
                             "CallRequest fields: to, caller_id, flow, campaign, listen_mode, voice_quality, "
                             "stream_on_answer, duration, loop, timeout, extra_params, extra_actions, start_at, "
                             "idempotency_key, max_attempts, backoff_s"}}}},
                         "responses": {"201": {"description": "enqueued: call_id, job_id and the URLs"},
                                       "200": {"description": "idempotency key already used for this call"},
                                       "409": _err("idempotency key used for a different call"),
                                       "413": _err("body too large"), "422": _err("invalid option"),
                                       **_AUTH_ERRORS}},
            },
            "/calls/events": {"get": {"summary": "the call list as Server-Sent Events (event 'calls', on change)",
                                      "security": _sec("read"),
                                      "responses": {"200": {"description": "text/event-stream"}, **_AUTH_ERRORS}}},
            "/calls/{call_id}": {"get": {
                "summary": "one call: record, timeline, transcript so far (final segments), URLs",
                "security": _sec("read", True), "parameters": [_CALL_ID, *_SIGNED],
                "responses": {"200": {"description": "the call"}, "404": _err("unknown call"), **_AUTH_ERRORS}}},
            "/calls/{call_id}/control": {"post": {
                "summary": "steer a live call; answers with the gateway's result",
                "security": _sec("control", True), "parameters": [_CALL_ID, *_SIGNED],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Control"}}}},
                "responses": {"200": {"description": "applied", "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/ControlResult"}}}},
                    "409": _err("rejected by the gateway, or the call is not live yet"),
                    "404": _err("unknown call"), "410": _err("call ended"), "413": _err("body too large"),
                    "422": _err("malformed control"), "504": _err("the gateway did not answer"),
                    **_AUTH_ERRORS}}},
            "/calls/{call_id}/listen": {"get": {
                "summary": "WebSocket: the call's live audio and events",
                "x-websocket": True,
                "description": "First a text 'hello' {rate, channels: [caller, agent], format: s16le, "
                               "interleaved: true, frame_ms: 20}; then binary 20 ms frames of interleaved "
                               "stereo 16-bit LE PCM at the call's rate (left: the inbound stream, right: "
                               "the audio we send) and text JSON messages of type event, transcript, "
                               "timeline, notice. A slow listener skips (oldest dropped) and is closed with "
                               "1008 when it keeps skipping or stops reading; 1000 when the call ends.",
                "security": _sec("listen", True), "parameters": [_CALL_ID, *_SIGNED],
                "responses": {"101": {"description": "switching protocols"}, "404": _err("unknown call"),
                              "409": _err("not live yet"), "410": _err("call ended"),
                              "503": _err("too many listeners"), **_AUTH_ERRORS}}},
            "/answer": {"post": {
                "summary": "the platform's answer URL for inbound calls: replies with a PCMO list",
                "security": [{"platform": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["action", "from", "to", "cmiuuid"], "properties": {
                        "action": {"const": "inbound"}, "from": {"type": "string"}, "to": {"type": "string"},
                        "time": {"type": "string"}, "cmiuuid": {"type": "string"}}}}}},
                "responses": {"200": {"description": "PCMO list: a stream action + the flow's actions"},
                              "422": _err("malformed inbound event"), **_AUTH_ERRORS}}},
        },
    }
