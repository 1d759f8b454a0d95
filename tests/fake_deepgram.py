"""A local stand-in for Deepgram's live streaming API (loopback only).

It speaks the protocol of ``speech.asr_deepgram``: checks the ``Token`` auth
header and the query (``encoding=linear16``, ``sample_rate``), takes binary
audio, sends an interim ``Results`` after every 0.5 s of audio revealing the
transcript word by word, and on ``{"type": "CloseStream"}`` sends the
``is_final``/``speech_final`` result, a ``Metadata`` message and closes.
"Recognition" is a fixture: connection i answers ``script[i]`` (the last one
again when the script runs out). ``mode`` makes it misbehave: ``garbage``
(non-JSON), ``hang`` (never answers CloseStream).
"""

from __future__ import annotations

import json
import threading
from urllib.parse import parse_qs, urlparse

from websockets.sync.server import serve


class FakeDeepgram:
    def __init__(self, script: list[str], api_key: str = "test-key", mode: str = "ok") -> None:
        self.script = list(script)
        self.api_key = api_key
        self.mode = mode
        self.connections = 0
        self.audio_bytes: list[int] = []
        self.queries: list[dict] = []
        self._server = serve(self._handler, "127.0.0.1", 0, process_request=self._auth,
                             compression=None)
        self.url = f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}/v1/listen"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _auth(self, connection, request):
        if request.headers.get("Authorization") != f"Token {self.api_key}":
            return connection.respond(401, "bad token\n")
        q = parse_qs(urlparse(request.path).query)
        if q.get("encoding") != ["linear16"] or q.get("sample_rate", [""])[0] not in ("8000", "16000", "32000"):
            return connection.respond(400, "bad query\n")
        return None

    def _handler(self, ws) -> None:
        i = self.connections
        self.connections += 1
        text = self.script[min(i, len(self.script) - 1)] if self.script else ""
        q = parse_qs(urlparse(ws.request.path).query)
        self.queries.append(q)
        rate = int(q["sample_rate"][0])
        words = text.split()
        got = 0
        sent_interims = 0
        for msg in ws:
            if isinstance(msg, bytes):
                got += len(msg)
                if self.mode == "garbage":
                    ws.send("this is not json")
                    continue
                if got // (rate) > sent_interims:  # every 0.5 s of 16-bit audio
                    sent_interims += 1
                    ws.send(json.dumps(_result(" ".join(words[:sent_interims]), False)))
                continue
            if json.loads(msg).get("type") == "CloseStream":
                self.audio_bytes.append(got)
                if self.mode == "hang":
                    continue
                ws.send(json.dumps(_result(text, True)))
                ws.send(json.dumps({"type": "Metadata", "request_id": f"fake-{i}"}))
                return

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


def _result(text: str, final: bool) -> dict:
    return {"type": "Results", "channel_index": [0, 1], "start": 0.0, "duration": 1.0,
            "is_final": final, "speech_final": final,
            "channel": {"alternatives": [{"transcript": text, "confidence": 0.9 if final else 0.5,
                                          "words": []}]}}
