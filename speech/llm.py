"""An OpenAI-compatible chat-completions client: streamed text and tool calls.

Theory of operation
-------------------
``ChatClient.stream(messages, tools)`` POSTs ``/chat/completions`` with
``"stream": true`` and turns the server-sent events into ``Delta`` items:

* each ``data: {...}`` line is one chunk; ``choices[0].delta.content`` pieces
  come out at once as ``Delta(text=...)`` so the caller can start speaking the
  first sentence while the model is still writing the rest;
* tool calls arrive in fragments keyed by ``index`` (the ``id`` and function
  ``name`` usually in the first fragment, ``arguments`` as a JSON string cut
  anywhere). They are assembled and, once the stream ends, come out together
  in one final ``Delta(tool_calls=..., finish_reason=...)``, each checked:
  the name must be one of the tools offered and the arguments a JSON object;
* ``data: [DONE]`` (or a ``finish_reason`` followed by the end of the body)
  ends the stream. A body that stops before either was cut: an error, never a
  silently short answer.

A request the server drops unanswered (it closed the kept-alive connection
as the request arrived: its keep-alive timeout) is sent once more on a new
connection, within the same deadlines; a refused connection is not retried.

Deadlines are what keep a phone call from going silent. ``first_token_s``
bounds the time from the request to the first content or tool-call fragment
(headers, queueing, prompt processing: a server that accepts the request and
then thinks for ever hits it); ``timeout_s`` bounds the whole exchange.
Every read waits at most for the nearer of the two, so a server that trickles
keep-alive bytes cannot stretch either.

Errors are ``LlmError`` subclasses (under ``PiopiyError``), one per way to
fail, because the agent reacts to each alike (fallback) but the timeline must
say which: ``LlmTimeout`` (``phase`` "first_token" | "total"),
``LlmHttpError`` (non-2xx; ``status``), ``LlmConnectionError`` (refused,
reset, cut mid-stream), ``LlmProtocolError`` (not SSE/JSON, an in-stream
error object, an unknown tool, tool arguments that are not a JSON object).

Any compatible server works: hosted APIs, vLLM, llama.cpp's server, Ollama
(``/v1``). The HTTP client is ``aiohttp`` (its C parser: a streamed token
costs 0.3x the CPU it cost through httpx, which spent most of it in its
pure-Python HTTP/1.1 state machine, and at 100 calls that CPU was the agent
runtime's biggest share, taken from the loop thread's GIL: BENCHMARKS.md
"Conversation"). Its session is made lazily in the running event loop (and
remade if the loop changes) so one ``ChatClient`` can be shared by every call
of a worker's agent runtime and keep its connections warm. Proxies come from
``HTTP(S)_PROXY``/``NO_PROXY``, as for any HTTP client.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Sequence

import aiohttp

from pydantic import Field, field_validator, model_validator

from piopiy_voice.errors import PiopiyConfigError, PiopiyError
from piopiy_voice.settings import EnvSection

#: A reply larger than this is not a spoken answer: refuse it.
MAX_REPLY_BYTES = 1_000_000
MAX_TOOL_CALLS = 8


class LlmError(PiopiyError):
    """Base of every chat-completions failure. ``kind`` is a short stable tag."""

    kind = "error"


class LlmTimeout(LlmError):
    kind = "timeout"

    def __init__(self, phase: str, seconds: float) -> None:
        self.phase = phase
        self.seconds = seconds
        what = "no first token" if phase == "first_token" else "reply not complete"
        super().__init__(f"{what} within {seconds:g}s")


class LlmHttpError(LlmError):
    kind = "http"

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body[:200]}")


class LlmConnectionError(LlmError):
    kind = "connection"


class LlmProtocolError(LlmError):
    kind = "protocol"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Delta:
    """One step of a streamed reply: a text piece, or (last) the tool calls."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None


class LlmConfigError(LlmError, PiopiyConfigError):
    """An LLM setting is wrong (the message names the variable)."""

    kind = "config"


class LlmConfig(EnvSection):
    """The client's knobs (``PV_LLM_*``, a section of the project's settings:
    ``piopiy_voice.settings.EnvSection``); per-call overrides via ``with_params``."""

    SECRETS = ("api_key",)
    ERROR = LlmConfigError

    #: OpenAI-compatible server (Ollama's default address).
    base_url: str = Field("http://127.0.0.1:11434/v1", alias="PV_LLM_BASE_URL")
    #: Sent as Bearer when set.
    api_key: str = Field("", alias="PV_LLM_API_KEY", repr=False)
    model: str = Field("llama3.2", alias="PV_LLM_MODEL", min_length=1)
    temperature: float = Field(0.4, alias="PV_LLM_TEMPERATURE", ge=0.0, le=2.0)
    #: Spoken replies are short.
    max_tokens: int = Field(200, alias="PV_LLM_MAX_TOKENS", ge=1, le=32_000)
    #: Deadline of a whole reply (s).
    timeout_s: float = Field(8.0, alias="PV_LLM_TIMEOUT_S", gt=0, le=600)
    #: Deadline of the first token (s); at most ``timeout_s``.
    first_token_s: float = Field(3.0, alias="PV_LLM_FIRST_TOKEN_S", gt=0, le=600)

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"LLM base URL must be http(s)://, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _first_token_within_total(self) -> "LlmConfig":
        if self.first_token_s > self.timeout_s:
            object.__setattr__(self, "first_token_s", self.timeout_s)  # frozen: set once, here
        return self

    def with_params(self, params: Mapping[str, str]) -> "LlmConfig":
        """Per-call ``model`` / ``temperature`` / ``max_tokens`` from the dial job's
        params. The server and key are deliberately NOT overridable from a call's
        params: they come from the operator's environment only."""
        changes: dict[str, Any] = {}
        if params.get("model"):
            changes["model"] = str(params["model"]).strip()
        for name, conv in (("temperature", float), ("max_tokens", int)):
            if params.get(name) not in (None, ""):
                try:
                    changes[name] = conv(params[name])
                except (TypeError, ValueError):
                    raise LlmError(f"call param {name} must be a number, got {params[name]!r}") from None
        return self.replace(**changes) if changes else self


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ChatClient:
    """Streams chat completions from one OpenAI-compatible server (see module doc)."""

    def __init__(self, config: LlmConfig | None = None, **overrides: Any) -> None:
        self._http: aiohttp.ClientSession | None = None
        self.config = (config or LlmConfig()).replace(**overrides) if overrides else (config or LlmConfig())
        self._loop: asyncio.AbstractEventLoop | None = None
        _live.add(self)

    @property
    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/chat/completions"

    def _forget(self) -> None:
        """Let the session go without a close (that needs its loop, which may be
        gone): it is only marked closed, so aiohttp does not log it as leaked
        when it is collected. For process exit and a client collected unclosed."""
        session, self._http = self._http, None
        if session is not None and not session.closed:
            connector = session.connector
            session.detach()
            if connector is not None and not connector.closed:
                try:
                    # aiohttp's own way to drop a connector's sockets without
                    # awaiting (what its finalizer does, minus the leak report).
                    connector._close()
                except Exception:  # noqa: BLE001 (a loop already closed: the sockets go with it)
                    pass

    def __del__(self) -> None:
        self._forget()

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop or self._http.closed:
            if self._loop is not loop:
                self._forget()   # bound to a loop that is gone (tests, a restarted runtime)
            # Our deadlines bound every read (``stream``); no session-wide timeout.
            # ``trust_env``: HTTP(S)_PROXY and NO_PROXY apply, as for any HTTP client.
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None), trust_env=True,
                auto_decompress=False)
            self._loop = loop
        return self._http

    async def aclose(self) -> None:
        if self._http is not None and not self._http.closed:
            await self._http.close()
        self._http = None

    def request_body(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None = None,
                     config: LlmConfig | None = None) -> dict[str, Any]:
        cfg = config or self.config
        body: dict[str, Any] = {"model": cfg.model, "messages": list(messages), "stream": True,
                                "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        if tools:
            body["tools"] = list(tools)
            body["tool_choice"] = "auto"
        return body

    async def stream(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None = None,
                     config: LlmConfig | None = None) -> AsyncIterator[Delta]:
        """Yield the reply as it arrives (see the module docstring).

        ``config`` overrides the client's model/parameters/deadlines for this
        request (per-call settings); the server and key stay the client's."""
        cfg = config or self.config
        loop = asyncio.get_running_loop()
        start = loop.time()
        first_deadline = start + cfg.first_token_s
        total_deadline = start + cfg.timeout_s
        got_token = False
        offered = {t.get("function", {}).get("name") for t in (tools or [])}
        # identity: a compressed event stream would hold tokens back in the decoder.
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "Accept-Encoding": "identity"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        body = self.request_body(messages, tools, cfg)

        def budget() -> tuple[float, str]:
            now = loop.time()
            if not got_token and first_deadline < total_deadline:
                return first_deadline - now, "first_token"
            return total_deadline - now, "total"

        async def bounded(aw):
            # Every read of the stream is bounded by what is left of the current
            # deadline. A timeout context, not ``wait_for``, which wraps each
            # awaited line in a new task: 0.71-0.73x the CPU per streamed token
            # (bench/llm_bench.py --compare-rev, BENCHMARKS.md "Conversation").
            left, phase = budget()
            if left <= 0:
                raise LlmTimeout(phase, cfg.first_token_s if phase == "first_token" else cfg.timeout_s)
            try:
                async with asyncio.timeout(left):
                    return await aw
            except TimeoutError:
                raise LlmTimeout(phase, cfg.first_token_s if phase == "first_token"
                                 else cfg.timeout_s) from None

        data = json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                response = await bounded(self._session().post(self.url, data=data, headers=headers))
                break
            except LlmError:
                raise
            except aiohttp.ClientError as exc:
                # A server closes an idle kept-alive connection when its own
                # keep-alive timeout ends (uvicorn's, under vLLM, is 5 s); a
                # request sent on it as it closes is dropped with no answer.
                # aiohttp resends such a request only for idempotent methods,
                # so this POST is sent once more, on a new connection, within
                # the same deadline. A connection refused is not retried: the
                # call's fallback must not wait for a server that is down.
                dropped = isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)) \
                    and not isinstance(exc, aiohttp.ClientConnectorError)
                if attempt == 2 or not dropped:
                    raise LlmConnectionError(f"cannot reach {self.url}: {exc!r}") from None
        finished = False
        try:
            if response.status // 100 != 2:
                raw = await bounded(response.read())
                raise LlmHttpError(response.status, raw[:500].decode("utf-8", "replace"))
            if response.headers.get("Content-Type", "").startswith("application/json"):
                # A server that ignored "stream": one JSON completion.
                raw = await bounded(response.read())
                finished = True
                async for d in self._whole(raw, offered):
                    yield d
                return
            calls: dict[int, _PartialCall] = {}
            finish: str | None = None
            done = False
            size = 0
            tail = b""
            content = response.content
            while not done:
                # One read takes whatever arrived: several events when the
                # server got ahead of us, so the per-read costs are shared.
                try:
                    got = await bounded(content.readany())
                except aiohttp.ClientError as exc:
                    raise LlmConnectionError(f"stream cut: {exc!r}") from None
                if not got:
                    break
                size += len(got)
                if size > MAX_REPLY_BYTES:
                    raise LlmProtocolError(f"reply larger than {MAX_REPLY_BYTES} bytes")
                *lines, tail = (tail + got).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, ": keep-alive" comments, "event:" lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    text, fragments, finish_now = _chunk(data, calls)
                    got_token = got_token or bool(text) or fragments
                    finish = finish_now or finish
                    if text:
                        yield Delta(text=text)
            if not done and finish is None:
                raise LlmConnectionError("stream ended before [DONE]")
            finished = done
            tool_calls = _finish_calls(calls, offered)
            if tool_calls or finish:
                yield Delta(tool_calls=tool_calls, finish_reason=finish or "stop")
        finally:
            # A reply read to its end leaves the connection to the pool (once the
            # body's end, usually right behind [DONE], has been read: off the
            # caller's path); anything else (an error, a cancel) closes it.
            if not finished:
                response.close()
            elif response.content.at_eof():
                response.release()
            else:
                task = asyncio.get_running_loop().create_task(_release_at_end(response))
                _draining.add(task)
                task.add_done_callback(_draining.discard)

    async def _whole(self, raw: bytes, offered: set) -> AsyncIterator[Delta]:
        data = _json(raw.decode("utf-8", "replace"))
        try:
            msg = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise LlmProtocolError("completion has no choices[0].message") from None
        if isinstance(msg.get("content"), str) and msg["content"]:
            yield Delta(text=msg["content"])
        calls: dict[int, _PartialCall] = {}
        for i, tc in enumerate(msg.get("tool_calls") or []):
            _merge(calls, {"index": i, **tc} if isinstance(tc, dict) else tc)
        yield Delta(tool_calls=_finish_calls(calls, offered),
                    finish_reason=str(data["choices"][0].get("finish_reason") or "stop"))

    async def complete(self, messages, tools=None, config=None) -> tuple[str, tuple[ToolCall, ...]]:
        """The whole reply: (text, tool calls). Same deadlines as ``stream``."""
        text, calls = [], ()
        async for d in self.stream(messages, tools, config):
            text.append(d.text)
            calls = d.tool_calls or calls
        return "".join(text), calls


#: After [DONE], how long the rest of a body may take before its connection is dropped.
DRAIN_S = 1.0
_draining: set[asyncio.Task] = set()


async def _release_at_end(response: aiohttp.ClientResponse) -> None:
    try:
        async with asyncio.timeout(DRAIN_S):
            size = 0
            while got := await response.content.readany():
                size += len(got)
                if size > MAX_REPLY_BYTES:
                    break
        if response.content.at_eof():
            response.release()
            return
    except (Exception, asyncio.CancelledError):  # noqa: BLE001 (whatever it was: drop it)
        pass
    response.close()


_live: "weakref.WeakSet[ChatClient]" = weakref.WeakSet()


@atexit.register
def _forget_sessions() -> None:
    # At exit module globals (``workers.agent.llm``'s clients) may outlive their loop.
    for client in list(_live):
        client._forget()


def _json(data: str | bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, RecursionError):
        raise LlmProtocolError(f"chunk is not JSON: {data[:80]!r}") from None
    if not isinstance(obj, dict):
        raise LlmProtocolError(f"chunk is not a JSON object: {data[:80]!r}")
    return obj


def _chunk(data: bytes, calls: dict[int, _PartialCall]) -> tuple[str, bool, str | None]:
    """One streamed chunk (a ``data:`` payload): (its text, whether it carried
    tool-call fragments, folded into ``calls``; its finish reason)."""
    chunk = _json(data)
    if "error" in chunk:
        raise LlmProtocolError(f"server error in stream: {str(chunk['error'])[:200]}")
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise LlmProtocolError("'choices' is not a list")
    if not choices:
        return "", False, None
    choice = choices[0]
    if not isinstance(choice, dict):
        raise LlmProtocolError("a choice is not an object")
    delta = choice.get("delta") or {}
    text = delta.get("content")
    fragments = delta.get("tool_calls") or []
    for frag in fragments:
        _merge(calls, frag)
    finish = choice.get("finish_reason")
    return (text if isinstance(text, str) else ""), bool(fragments), (str(finish) if finish else None)


def _merge(calls: dict[int, _PartialCall], frag: Any) -> None:
    """Fold one streamed tool-call fragment into the call it belongs to."""
    if not isinstance(frag, dict):
        raise LlmProtocolError("a tool-call fragment is not an object")
    index = frag.get("index", 0)
    if not isinstance(index, int) or not 0 <= index < MAX_TOOL_CALLS:
        raise LlmProtocolError(f"tool-call index {index!r} out of range")
    call = calls.setdefault(index, _PartialCall())
    if frag.get("id"):
        call.id = str(frag["id"])
    fn = frag.get("function") or {}
    if not isinstance(fn, dict):
        raise LlmProtocolError("tool-call 'function' is not an object")
    if fn.get("name"):
        name = str(fn["name"])
        if name != call.name:  # some servers repeat the whole name in every fragment
            call.name += name
    if isinstance(fn.get("arguments"), str):
        call.arguments.append(fn["arguments"])
    elif isinstance(fn.get("arguments"), dict):  # some servers send an object already
        call.arguments.append(json.dumps(fn["arguments"]))


def _finish_calls(calls: dict[int, _PartialCall], offered: set) -> tuple[ToolCall, ...]:
    out = []
    for index in sorted(calls):
        call = calls[index]
        if not call.name:
            raise LlmProtocolError(f"tool call #{index} has no function name")
        if offered and call.name not in offered:
            raise LlmProtocolError(f"unknown tool {call.name!r} (offered: {', '.join(sorted(offered))})")
        raw = "".join(call.arguments).strip() or "{}"
        try:
            args = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise LlmProtocolError(f"tool {call.name!r}: arguments are not JSON: {raw[:80]!r}") from None
        if not isinstance(args, dict):
            raise LlmProtocolError(f"tool {call.name!r}: arguments must be a JSON object")
        out.append(ToolCall(id=call.id or f"call_{index}", name=call.name, arguments=args))
    return tuple(out)
