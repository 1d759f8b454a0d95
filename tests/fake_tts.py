"""A local OpenAI-compatible speech endpoint (``POST /v1/audio/speech``) on loopback.

It answers a sine tone whose length follows the text (40 ms per character),
as a 24 kHz WAV (``response_format`` "wav") or raw 24 kHz PCM ("pcm"). ``mode``
makes it misbehave: ``error`` (HTTP 500), ``trickle`` (headers one byte every
0.2 s, never finishing in time), ``garbage`` (200 with a text body).
Requests are recorded (JSON body and headers) for assertions.
"""

from __future__ import annotations

import io
import json
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

RATE = 24000


def tone(n_chars: int) -> bytes:
    t = np.arange(int(RATE * 0.04 * n_chars)) / RATE
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


class FakeTts:
    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[tuple[dict, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                fake.requests.append((body, dict(self.headers)))
                if self.path != "/v1/audio/speech":
                    self.send_error(404)
                    return
                if fake.mode == "error":
                    self.send_response(500)
                    self.send_header("Content-Length", "13")
                    self.end_headers()
                    self.wfile.write(b"model crashed")
                    return
                if fake.mode == "trickle":
                    try:
                        for ch in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                            self.wfile.write(bytes([ch]))
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                pcm = tone(len(body["input"]))
                if fake.mode == "garbage":
                    data, ctype = b"<html>oops</html>", "text/html"
                elif body.get("response_format") == "pcm":
                    data, ctype = pcm, "audio/pcm"
                else:
                    buf = io.BytesIO()
                    with wave.open(buf, "wb") as w:
                        w.setnchannels(1)
                        w.setsampwidth(2)
                        w.setframerate(RATE)
                        w.writeframes(pcm)
                    data, ctype = buf.getvalue(), "audio/wav"
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
