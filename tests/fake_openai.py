"""A local OpenAI-compatible chat-completions server for tests (loopback only).

It speaks the real protocol: ``POST /v1/chat/completions`` with
``"stream": true`` answers ``text/event-stream`` in HTTP/1.1 chunked encoding,
one ``data: {chunk}`` event per token, tool calls in fragments (id and name
first, the arguments JSON cut in pieces), then ``data: [DONE]``. It checks the
request like a strict server would (model, messages, and every assistant
``tool_calls`` answered by ``tool`` messages) and answers 400 otherwise.

What each request gets is a ``Reply`` taken from ``server.replies`` (a queue;
when it is empty, ``server.default``). A reply can be slow (first token after
``first_token_delay_s``), broken (``status`` 500, ``drop_after`` chunks then
the connection is cut without the chunked terminator) or malformed
(``bad_chunk_at``: a data line that is not JSON; tool calls with an unknown
name or arguments that are not JSON are simply what the reply says).
``server.requests`` records every request body.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    text: str = "Hello there. How can I help?"
    #: [{"name": ..., "arguments": "<raw JSON text>"}]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    token_delay_s: float = 0.005
    first_token_delay_s: float = 0.0
    status: int = 200
    drop_after: int | None = None      # chunks sent before the connection is cut
    bad_chunk_at: int | None = None    # index of a chunk replaced by non-JSON
    send_done: bool = True
    stream: bool = True                # False: one JSON completion (ignores "stream")
    #: The connection is closed with no answer once the request is read: what
    #: a server's keep-alive timeout does to a request that arrives as it closes.
    hang_up: bool = False


def _tokens(text: str) -> list[str]:
    """Word-ish tokens, like a real tokenizer's output (spaces lead)."""
    out, cur = [], ""
    for ch in text:
        if ch == " " and cur:
            out.append(cur)
            cur = ""
        cur += ch
    if cur:
        out.append(cur)
    return out


def _check_request(body: Any) -> str | None:
    if not isinstance(body, dict) or not body.get("model"):
        return "model is required"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages must be a non-empty list"
    pending: set[str] = set()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            return f"messages[{i}]: bad role"
        if pending and m["role"] != "tool":
            return f"messages[{i}]: tool_calls {sorted(pending)} not answered by tool messages"
        if m["role"] == "tool":
            if m.get("tool_call_id") not in pending:
                return f"messages[{i}]: tool message for unknown tool_call_id"
            pending.discard(m["tool_call_id"])
        if m["role"] == "assistant" and m.get("tool_calls"):
            pending = {tc["id"] for tc in m["tool_calls"]}
        elif m["role"] in ("system", "user", "assistant") and not isinstance(m.get("content"), str):
            return f"messages[{i}]: content must be a string"
    if pending:
        return "last assistant tool_calls not answered"
    return None


class FakeOpenAI:
    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.default = Reply()
        self.requests: list[dict[str, Any]] = []
        #: The client address of each request: which connection carried it.
        self.peers: list[tuple[str, int]] = []
        #: False: a streamed reply closes its connection (``Connection: close``);
        #: True: the connection stays open for the next request, as hosted APIs,
        #: vLLM and llama.cpp keep it.
        self.keep_alive = False
        self.stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(n))
                except ValueError:
                    body = None
                fake.requests.append(body)
                fake.peers.append(self.client_address)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._plain(404, {"error": {"message": "not found"}})
                problem = _check_request(body)
                if problem:
                    return self._plain(400, {"error": {"message": problem}})
                reply = fake.replies.popleft() if fake.replies else fake.default
                if reply.hang_up:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                fake._sleep(reply.first_token_delay_s)
                if reply.status != 200:
                    return self._plain(reply.status, {"error": {"message": "internal error"}})
                if not reply.stream or not body.get("stream"):
                    return self._plain(200, fake.completion(body, reply))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                if not fake.keep_alive:
                    self.send_header("Connection", "close")
                self.end_headers()
                for i, chunk in enumerate(fake.chunks(body, reply)):
                    if reply.drop_after is not None and i >= reply.drop_after:
                        self.wfile.flush()
                        self.connection.shutdown(2)  # cut: no chunked terminator
                        return
                    line = "data: {not json" if i == reply.bad_chunk_at else (
                        "data: " + (chunk if isinstance(chunk, str) else json.dumps(chunk)))
                    if not self._chunk((line + "\n\n").encode()):
                        return
                    if i:
                        fake._sleep(reply.token_delay_s)
                self._chunk(b"")

            def _chunk(self, data: bytes) -> bool:
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    return True
                except OSError:
                    return False  # the client gave up (deadline): fine

            def _plain(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _sleep(self, s: float) -> None:
        self.stopping.wait(s)  # returns at once when the server closes

    def chunks(self, body: dict, reply: Reply) -> list[Any]:
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                "model": body["model"]}

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        out: list[Any] = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"content": t}) for t in _tokens(reply.text)]
        for i, tc in enumerate(reply.tool_calls):
            out.append(chunk({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                              "function": {"name": tc["name"], "arguments": ""}}]}))
            args = tc.get("arguments", "{}")
            for j in range(0, len(args), 7):
                out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 7]}}]}))
        out.append(chunk({}, "tool_calls" if reply.tool_calls else "stop"))
        if reply.send_done:
            out.append("[DONE]")
        return out

    def completion(self, body: dict, reply: Reply) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.tool_calls:
            msg["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                                  "function": {"name": tc["name"], "arguments": tc.get("arguments", "{}")}}
                                 for i, tc in enumerate(reply.tool_calls)]
        return {"id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": msg,
                             "finish_reason": "tool_calls" if reply.tool_calls else "stop"}]}

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":  # a manual stand-in: PV_LLM_BASE_URL=<printed url>
    fake = FakeOpenAI()
    print(fake.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.close()
