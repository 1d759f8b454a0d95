"""Network recognition: Deepgram's live streaming WebSocket API.

Theory of operation
-------------------
One WebSocket per segment stream (a segment is one utterance cut by the VAD,
so connections are short and a broken one costs one utterance):

    GET wss://api.deepgram.com/v1/listen?encoding=linear16&sample_rate=8000
        &channels=1&interim_results=true[&model=...]
    Authorization: Token <api key>

Binary messages carry raw 16-bit PCM at the call rate; the server answers
JSON ``{"type": "Results", "is_final": .., "speech_final": ..,
"channel": {"alternatives": [{"transcript": .., "confidence": ..}]}}``.
``is_final`` pieces are settled and concatenate into the utterance; an
interim piece is the current guess for the part after them. ``{"type":
"CloseStream"}`` asks the server to flush its last results and close.

The client is the *synchronous* ``websockets.sync.client`` used from the
transcriber's single thread: ``feed`` sends and then drains whatever the
server has already answered without waiting (``recv(timeout=0)``), so
recognition never blocks the loop on the network except in ``open``
(connect, bounded by ``connect_timeout_s``) and ``finish`` (bounded by
``finish_timeout_s``). A transcriber running this engine does little CPU work
and can own many more calls than with pocketsphinx.

Errors (refused key, unreachable host, malformed JSON, server gone) raise
``RecognitionError`` with the reason.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

from .asr import Hyp
from .errors import EngineUnavailable, RecognitionError, SpeechError


class _Stream:
    def __init__(self, rec: "DeepgramRecognizer", rate: int) -> None:
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        self._rec = rec
        q = {"encoding": "linear16", "sample_rate": rate, "channels": 1, "interim_results": "true",
             "punctuate": "true"}
        if rec.model:
            q["model"] = rec.model
        url = f"{rec.url}?{urlencode(q)}"
        headers = {"Authorization": f"Token {rec.api_key}"} if rec.api_key else {}
        try:
            # Entered as a context manager (websockets >= 16 warns on bare use);
            # closed by finish()/close().
            self._ws = connect(url, additional_headers=headers, open_timeout=rec.connect_timeout_s,
                               compression=None, max_size=2 ** 20, close_timeout=1).__enter__()
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise RecognitionError(f"deepgram refused the stream: HTTP {status}"
                                   + (" (check PV_DEEPGRAM_API_KEY)" if status in (401, 403) else "")) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise RecognitionError(f"deepgram unreachable at {rec.url}: {exc!r}") from None
        self._finals: list[str] = []
        self._interim = ""
        self._conf: list[float] = []
        self._last_partial = ""
        self._open = True

    def _handle(self, raw: Any) -> None:
        if isinstance(raw, bytes):
            raise RecognitionError("deepgram sent a binary message; expected JSON")
        try:
            msg = json.loads(raw)
        except ValueError:
            raise RecognitionError(f"deepgram sent malformed JSON: {raw[:100]!r}") from None
        if not isinstance(msg, dict):
            raise RecognitionError("deepgram sent JSON that is not an object")
        if msg.get("type") != "Results":
            if msg.get("type") == "Error" or "err_code" in msg:
                raise RecognitionError(f"deepgram error: {msg.get('description') or msg}")
            return  # Metadata, SpeechStarted, UtteranceEnd
        try:
            alt = msg["channel"]["alternatives"][0]
            text = str(alt.get("transcript", "")).strip()
            conf = alt.get("confidence")
        except (KeyError, IndexError, TypeError):
            raise RecognitionError("deepgram Results without channel.alternatives[0]") from None
        if msg.get("is_final"):
            if text:
                self._finals.append(text)
                if isinstance(conf, (int, float)):
                    self._conf.append(float(conf))
            self._interim = ""
        else:
            self._interim = text

    def _text(self) -> str:
        return " ".join([*self._finals, self._interim]).strip()

    def _drain(self) -> None:
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                raw = self._ws.recv(timeout=0)
            except TimeoutError:
                return
            except ConnectionClosed as exc:
                self._open = False
                raise RecognitionError(f"deepgram closed the stream early: {exc}") from None
            self._handle(raw)

    def feed(self, pcm: bytes) -> list[Hyp]:
        from websockets.exceptions import ConnectionClosed

        if not self._open:
            raise RecognitionError("feed() on a finished deepgram stream")
        try:
            self._ws.send(bytes(pcm))
        except ConnectionClosed as exc:
            self._open = False
            raise RecognitionError(f"deepgram closed the stream: {exc}") from None
        self._drain()
        text = self._text()
        if text and text != self._last_partial:
            self._last_partial = text
            return [Hyp(text, False)]
        return []

    def finish(self) -> Hyp:
        from websockets.exceptions import ConnectionClosed

        if not self._open:
            raise RecognitionError("finish() on a finished deepgram stream")
        self._open = False
        deadline = time.monotonic() + self._rec.finish_timeout_s
        try:
            self._ws.send(json.dumps({"type": "CloseStream"}))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RecognitionError(f"deepgram gave no final result within "
                                           f"{self._rec.finish_timeout_s:g}s")
                try:
                    self._handle(self._ws.recv(timeout=left))
                except TimeoutError:
                    continue
        except ConnectionClosed:
            pass  # the server closes once everything is flushed: done
        finally:
            self._ws.close()
        self._interim = ""  # an unsettled guess is not a result
        conf = round(sum(self._conf) / len(self._conf), 3) if self._conf else None
        return Hyp(self._text(), True, conf)

    def close(self) -> None:
        self._open = False
        try:
            self._ws.close()
        except Exception:  # noqa: BLE001
            pass


class DeepgramRecognizer:
    name = "deepgram"

    def __init__(self, url: str = "wss://api.deepgram.com/v1/listen", api_key: str = "",
                 model: str = "", connect_timeout_s: float = 5.0, finish_timeout_s: float = 5.0) -> None:
        try:
            import websockets.sync.client  # noqa: F401
        except ImportError:
            raise EngineUnavailable("the deepgram recognizer needs the websockets package") from None
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise SpeechError(f"PV_DEEPGRAM_URL must be a ws:// or wss:// URL, got {url!r}")
        if url.startswith("wss://api.deepgram.com") and not api_key:
            raise SpeechError("the deepgram recognizer needs PV_DEEPGRAM_API_KEY")
        self.url = url
        self.api_key = api_key
        self.model = model
        self.connect_timeout_s = float(connect_timeout_s)
        self.finish_timeout_s = float(finish_timeout_s)

    def open(self, rate: int) -> _Stream:
        if rate not in (8000, 16000, 32000) or isinstance(rate, bool):
            raise RecognitionError(f"rate must be 8000, 16000 or 32000, got {rate!r}")
        return _Stream(self, rate)
