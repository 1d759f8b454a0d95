"""The socket side of the hot path: frames handed to the call, and the call's
audio written to the socket, without a task switch."""

from __future__ import annotations

import logging
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import State

log = logging.getLogger("gateway")

#: ``DirectConnection.write_state``: write now / hold (the peer is not reading) / gone.
WRITE_OPEN, WRITE_FULL, WRITE_CLOSED = "open", "full", "closed"


class DirectConnection(ServerConnection):
    """A server connection that hands complete data frames straight to the call.

    ``websockets`` normally queues each message for ``recv()`` and wakes the
    handler task once per frame; at 50 frames per second per call that wake-up
    costs about as much as everything else the gateway does. Here, once the
    handler has called ``set_sink``, each unfragmented text or binary frame is
    passed to the sink synchronously from ``data_received``, in arrival order
    (frames that arrived before that are kept and replayed first). A
    fragmented message switches the connection back to the ordinary queue for
    good, after handing over what was kept, so order is preserved; the
    platform is not known to fragment. Pings, pongs, close frames and the size
    limit are still handled by the protocol. Text that is not UTF-8 is passed
    on as ``None`` (counted as malformed) rather than failing the connection
    with 1007: a text frame must never end a call.

    The other way, ``write_texts`` writes the playout tick's messages with no
    coroutine per message: the frames are built by the protocol and handed to
    the transport at once, as ``websockets``' own ``broadcast`` does, under the
    same rules (the connection open, no fragmented message being sent). What
    ``send()`` would then do (wait while the write buffer is above its
    high-water mark) is the caller's to do: ``write_state`` says ``full`` and
    the caller holds its audio instead of buffering it.

    ``gate`` (the gateway's ``Handshake``, set on a per-gateway subclass) is told
    when the connection opens (it may refuse: too many handshakes pending),
    every HTTP response it sends (refusals are counted whoever wrote them:
    websockets answers 414/431/426/405 itself) and when it is lost.
    """

    gate: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink: Callable[[bool, Any], None] | None = None
        self._early: list[Frame] | None = []
        self._direct = True
        #: Why process_request refused this connection (a metrics label).
        self.refusal: str | None = None
        self.counted_pending = False
        gate = self.gate
        if gate is not None:
            send_response = self.protocol.send_response

            def reported(response: Any) -> None:
                send_response(response)
                gate.response_sent(self, response.status_code)

            self.protocol.send_response = reported  # type: ignore[method-assign]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.gate is not None and not self.gate.connection_opened(self):
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.gate is not None:
            self.gate.connection_lost(self)

    def set_sink(self, sink: Callable[[bool, Any], None] | None) -> None:
        early, self._early = self._early, None
        self.sink = sink
        for frame in early or ():
            self.process_event(frame)

    def _fallback(self) -> None:
        self._direct = False
        self.sink = None
        early, self._early = self._early, None
        for frame in early or ():
            super().process_event(frame)

    def process_event(self, event: Any) -> None:
        if self._direct and event.__class__ is Frame:
            op = event.opcode
            if op is Opcode.BINARY or op is Opcode.TEXT:
                if not event.fin:
                    self._fallback()
                elif self.sink is not None:
                    self._deliver(op is Opcode.BINARY, event.data)
                    return
                elif self._early is not None and len(self._early) < 1000:
                    self._early.append(event)
                    return
                else:
                    self._fallback()
            elif op is Opcode.CONT:
                self._fallback()
        super().process_event(event)

    def _deliver(self, binary: bool, data: Any) -> None:
        if binary:
            msg = data if data.__class__ is bytes else bytes(data)
        else:
            try:
                msg = bytes(data).decode()
            except UnicodeDecodeError:
                msg = None
        try:
            self.sink(binary, msg)  # type: ignore[misc]
        except Exception:  # a bug in one call must not break the transport callback
            log.exception("socket sink failed")

    # ------------------------------------------------------------- writes
    def write_state(self) -> str:
        """``WRITE_OPEN``: write now; ``WRITE_FULL``: more than the write limit
        (websockets' ``write_limit``, where ``send()`` would block) waits in
        the transport, or a fragmented send is under way: hold; ``WRITE_CLOSED``:
        closing or closed, nothing more goes out."""
        if self.protocol.state is not State.OPEN or self.transport.is_closing():
            return WRITE_CLOSED
        # (getattr: websockets < 16 names the fragmented-send future otherwise;
        # the gateway never fragments, so there it is only a safety net.)
        if (getattr(self, "send_in_progress", None) is not None
                or self.transport.get_write_buffer_size() > self.write_limit_high):
            return WRITE_FULL
        return WRITE_OPEN

    def write_texts(self, texts: list[str]) -> None:
        """Write text messages now, in order, without awaiting (only after
        ``write_state()`` said ``WRITE_OPEN`` in the same loop turn)."""
        send_text = self.protocol.send_text
        for text in texts:
            send_text(text.encode())
        try:
            self.send_data()
        except Exception as exc:  # noqa: BLE001 - what send() does: the connection is broken
            self.set_connection_exc(exc)
            self.transport.abort()
