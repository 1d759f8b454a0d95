"""The socket side of the hot path: frames handed to the call, and the call's
audio written to the socket, without a task switch.

Theory of operation
-------------------
``websockets`` turns bytes into frames with a generator parser (a few
generator resumptions, an ``Opcode`` enum lookup, a ``Frame`` object and a
list of events per frame) and frames into bytes through ``Frame.serialize``
(a ``BytesIO`` per frame) and one transport write per frame. At 50 inbound
frames and 25 outbound chunks a second per call that bookkeeping costs about
as much as the gateway's own work, so ``DirectConnection`` does the two common
cases itself and leaves everything else to the library, unchanged:

* Receiving. While *in step* (below), ``data_received`` reads the complete
  frames at the front of each read itself, as long as each is an unfragmented,
  masked, uncompressed text or binary frame within the size limit (what the
  platform sends): header, unmasking (``websockets``' own C ``apply_mask``),
  then straight to the sink. The first byte of anything else (a control frame,
  a fragment, a frame cut by the read, an oversize or malformed header) and
  all that follows it in that read go to the library's parser, which handles
  them as it always does (pings answered, close handshake, 1009 over the
  limit, 1002 for protocol errors) and hands data frames on through
  ``process_event``, in order.
  *In step* means the library's parser waits at a frame boundary with nothing
  buffered (its generator is suspended in ``StreamReader.at_eof`` directly
  under ``Protocol.parse``), the connection is open, no fragmented message is
  being received, and the sink is set; it is checked when the sink is set and
  after every read the library was given, and it holds as long as only the
  fast path reads (which never leaves bytes behind). If the parser is replaced
  (the connection failed) or the library changes shape, the check fails and
  every read goes to the library: slower, never wrong.
* Sending. ``write_texts`` writes the playout tick's messages as unmasked text
  frames (a server never masks, RFC 6455 5.1) built here: a 2-, 4- or 10-byte
  header and the UTF-8 payload, all of one call's messages in one transport
  write. It writes only under the conditions ``websockets``' own ``broadcast``
  requires (the connection open, no fragmented message being sent;
  ``write_state`` says so), after anything the library has queued, and falls
  back to the library's frame builder when an extension is negotiated (the
  gateway negotiates none). What ``send()`` would then do (wait while the
  write buffer is above its high-water mark) is the caller's to do:
  ``write_state`` says ``full`` and the caller holds its audio instead of
  buffering it.

Before the sink is set (the handler has not started), frames the library
parsed are kept and replayed first. A fragmented message switches the
connection back to the library's ordinary queue for good, after handing over
what was kept, so order is preserved; the platform is not known to fragment.
Text that is not UTF-8 is passed on as ``None`` (counted as malformed) rather
than failing the connection with 1007: a text frame must never end a call.

``gate`` (the gateway's ``Handshake``, set on a per-gateway subclass) is told
when the connection opens (it may refuse: too many handshakes pending), every
HTTP response it sends (refusals are counted whoever wrote them: websockets
answers 414/431/426/405 itself) and when it is lost.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode, apply_mask
from websockets.protocol import Protocol, State
from websockets.streams import StreamReader

log = logging.getLogger("gateway")

#: ``DirectConnection.write_state``: write now / hold (the peer is not reading) / gone.
WRITE_OPEN, WRITE_FULL, WRITE_CLOSED = "open", "full", "closed"

# The library's parser at a frame boundary: ``Protocol.parse`` suspended in
# ``yield from self.reader.at_eof()`` (see "in step" above).
_PARSE_CODE = Protocol.parse.__code__
_AT_EOF_CODE = StreamReader.at_eof.__code__
#: First byte of an unfragmented, uncompressed text / binary frame (FIN + opcode).
_TEXT_FIN, _BINARY_FIN = 0x81, 0x82
#: Text frame headers (server to client: FIN + text, unmasked) by payload length < 126.
_TEXT_HEADS = [bytes((_TEXT_FIN, n)) for n in range(126)]


def _at_frame_boundary(protocol: Any) -> bool:
    """The library's frame parser is waiting for the first byte of a frame."""
    gen = getattr(protocol, "parser", None)
    parent = None
    while gen is not None:
        sub = getattr(gen, "gi_yieldfrom", None)
        if sub is None:
            break
        parent, gen = gen, sub
    return (gen is not None and getattr(gen, "gi_code", None) is _AT_EOF_CODE
            and parent is not None and getattr(parent, "gi_code", None) is _PARSE_CODE)


def text_frame(payload: bytes) -> bytes:
    """The header of one unmasked, unfragmented text frame carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return _TEXT_HEADS[n]
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


class DirectConnection(ServerConnection):
    """A server connection that hands complete data frames straight to the call
    and writes the playout's messages synchronously (see the module docstring)."""

    gate: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink: Callable[[bool, Any], None] | None = None
        self._early: list[Frame] | None = []
        self._direct = True
        #: The library's parser generator while in step (None: not in step).
        self._in_step: Any = None
        #: The largest data frame the fast path reads (the protocol's limit).
        self._max_frame = 0
        #: Frames read by the fast path (tests check it is taken).
        self.fast_frames = 0
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
        self._in_step = None
        super().connection_lost(exc)
        if self.gate is not None:
            self.gate.connection_lost(self)

    def set_sink(self, sink: Callable[[bool, Any], None] | None) -> None:
        early, self._early = self._early, None
        self.sink = sink
        self._in_step = None
        for frame in early or ():
            self.process_event(frame)
        self._step()

    def _fallback(self) -> None:
        self._direct = False
        self._in_step = None
        self.sink = None
        early, self._early = self._early, None
        for frame in early or ():
            super().process_event(frame)

    # ------------------------------------------------------------ reading
    def _step(self) -> None:
        """Take over the reading if the library's parser is in step (see above)."""
        p = self.protocol
        if (self._direct and self.sink is not None and p.state is State.OPEN
                and p.current_size is None and not p.extensions and _at_frame_boundary(p)):
            limits = [x for x in (p.max_message_size, p.max_fragment_size) if x is not None]
            self._max_frame = min(limits) if limits else 1 << 62
            self._in_step = p.parser
        else:
            self._in_step = None

    def data_received(self, data: bytes) -> None:
        parser = self._in_step
        if parser is None or parser is not self.protocol.parser:
            super().data_received(data)
            self._step()
            return
        n = len(data)
        pos = 0
        limit = self._max_frame
        # One iteration per complete fast-path frame; anything else ends the loop.
        while pos + 6 <= n and self._in_step is parser:
            b0 = data[pos]
            if b0 != _BINARY_FIN and b0 != _TEXT_FIN:
                break
            length = data[pos + 1] - 0x80  # the mask bit must be set (a client's frame)
            if length < 0:
                break
            if length < 126:
                head = pos + 6
            elif length == 126 and pos + 8 <= n:
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = pos + 8
            else:
                break
            end = head + length
            if end > n or length > limit:
                break
            payload = apply_mask(data[head:end], data[head - 4:head])
            pos = end
            self.fast_frames += 1
            self._deliver(b0 == _BINARY_FIN, payload)
        if pos < n:
            super().data_received(data[pos:] if pos else data)
            self._step()

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
        """Write text messages now, in order, in one transport write, without
        awaiting (only after ``write_state()`` said ``WRITE_OPEN`` in the same
        loop turn)."""
        protocol = self.protocol
        if protocol.extensions:  # (never in the gateway) the library frames them
            for text in texts:
                protocol.send_text(text.encode())
            out = b""
        else:
            parts = []
            for text in texts:
                payload = text.encode()
                parts.append(text_frame(payload))
                parts.append(payload)
            out = b"".join(parts)
        try:
            if protocol.writes:
                self.send_data()  # what the library queued goes first
            if out:
                self.transport.write(out)
        except Exception as exc:  # noqa: BLE001 - what send() does: the connection is broken
            self.set_connection_exc(exc)
            self.transport.abort()
