"""DirectConnection's own frame reading and writing, over real sockets on loopback.

The platform's side is a raw TCP client here, so the tests control exactly how
frames fall into reads: several in one write, one cut across writes, one byte
at a time, control frames between data frames, frames pipelined with the
handshake, and frames the fast path must leave to ``websockets`` (unmasked,
reserved bits, 64-bit lengths, over the size limit).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest
from websockets.asyncio.client import connect

from piopiy_voice.gateway.connection import text_frame
from test_gateway_server import entries, of_type, run, running, until, url

pytestmark = pytest.mark.integration


def frame(payload: bytes, *, opcode: int = 0x2, fin: bool = True, rsv: int = 0,
          mask: bytes | None = None) -> bytes:
    """One client frame (masked with a random key unless ``mask`` is b"")."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    if mask is None:
        mask = os.urandom(4)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 65536:
        head = bytes((b0, bit | 126)) + struct.pack(">H", n)
    else:
        head = bytes((b0, bit | 127)) + struct.pack(">Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if mask else payload
    return head + mask + body


class RawPlatform:
    """The platform as a raw socket: handshake by hand, frames written as given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, gw, call_id: str, *, then: bytes = b"") -> "RawPlatform":
        """Connect and send the upgrade request, with ``then`` in the same write."""
        full = url(gw, call_id)
        path = full.split(f":{gw.port}", 1)[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
                      f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n\r\n").encode() + then)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the server's next frame (never masked)."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), 5)
        assert not b1 & 0x80, "a server frame must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await self.reader.readexactly(8))[0]
        return b0 & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), 5)

    async def close(self) -> None:
        await self.write(frame(struct.pack(">H", 1000), opcode=0x8))
        while (await self.read_frame())[0] != 0x8:
            pass
        self.writer.close()


def pcm(tag: int, n: int = 320) -> bytes:
    return bytes((tag + i) % 256 for i in range(n))


async def audio_of(client, cid) -> bytes:
    return b"".join(m.pcm for m in await of_type(client, cid, "audio"))


def test_frames_in_any_read_layout_arrive_whole_and_in_order(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            # Two frames pipelined with the handshake: parsed by websockets
            # before the handler sets the sink, kept and replayed first.
            p = await RawPlatform.open(gw, "call-raw", then=frame(pcm(1)) + frame(pcm(2)))
            conn = await until(lambda: _conn(gw, "call-raw"), what="socket attached")
            sent = [pcm(1), pcm(2)]
            # Several frames in one read, a text frame and a ping among them,
            # a 16-bit length, then a frame cut in the middle of its header.
            big = pcm(3, 640)
            ping = frame(b"are-you-there", opcode=0x9)
            last = frame(pcm(5))
            await p.write(frame(pcm(4)) + frame(b'{"event": "mark", "name": "m1"}', opcode=0x1)
                          + ping + frame(big) + last[:3])
            sent += [pcm(4), big]
            assert await p.read_frame() == (0xA, b"are-you-there")  # pong, answered by websockets
            await p.write(last[3:])
            sent.append(pcm(5))
            # A frame one byte per write, then frames one per write again.
            for b in frame(pcm(6)):
                await p.write(bytes((b,)))
            sent.append(pcm(6))
            await until(lambda: _audio_len(client, "call-raw", len(b"".join(sent))),
                        what="the frame written byte by byte")
            before = conn.fast_frames
            for k in (7, 8, 9):
                await p.write(frame(pcm(k)))
            sent += [pcm(k) for k in (7, 8, 9)]
            await until(lambda: _audio_len(client, "call-raw", len(b"".join(sent))),
                        what="all audio")
            # Back on the fast path after every detour through websockets' parser.
            assert conn.fast_frames >= before + 3
            await p.close()
            await until(lambda: of_type(client, "call-raw", "call.ended"), what="end")
            es = [m for _, m in await entries(client, "call-raw")]
            assert b"".join(m.pcm for m in es if m.type == "audio") == b"".join(sent)
            kinds = [m.type for m in es]
            # The mark is published between the frames it was sent between.
            mark = kinds.index("platform.event")
            assert b"".join(m.pcm for m in es[:mark] if m.type == "audio") == b"".join(sent[:3])
            assert es[mark].data == {"name": "m1"}
            seqs = [m.seq for m in es]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert es[-1].reason == "platform_closed" and es[-1].frames_dropped == 0
    run(scenario())


async def _conn(gw, cid):
    live = gw.registry.get(cid)
    return live.ws if live is not None and live.ws is not None else None


async def _detached(gw, cid):
    live = gw.registry.get(cid)
    return live is None or live.ws is None


async def _audio_len(client, cid, n):
    return len(await audio_of(client, cid)) >= n


@pytest.mark.parametrize("bad, code", [
    (frame(pcm(1), mask=b""), 1002),                        # a client frame must be masked
    (frame(pcm(1), rsv=0x40), 1002),                        # no extension negotiated
    (frame(pcm(1, 5000)), 1009),                            # over max_frame_bytes (4096)
    (frame(pcm(1, 70_000)), 1009),                          # 64-bit length, over the limit
    (frame(pcm(1), opcode=0x0), 1002),                      # continuation out of nowhere
])
def test_frames_the_fast_path_leaves_to_websockets_fail_as_before(redis_url, r, bad, code):
    async def scenario():
        async with running(redis_url, max_frame_bytes=4096) as (gw, client):
            p = await RawPlatform.open(gw, "call-bad")
            await until(lambda: _conn(gw, "call-bad"), what="socket attached")
            await p.write(frame(pcm(1)) + bad + frame(pcm(2)))
            while True:
                op, payload = await p.read_frame()
                if op == 0x8:
                    break
            assert struct.unpack(">H", payload[:2])[0] == code
            await p.write(frame(payload[:2], opcode=0x8))  # the closing handshake
            p.writer.close()
            await until(lambda: _detached(gw, "call-bad"), what="socket detached")
            # What came before the bad frame was published, nothing after it.
            assert await audio_of(client, "call-bad") == pcm(1)
            if code == 1009:
                ended = await until(lambda: of_type(client, "call-bad", "call.ended"), what="end")
                assert ended[0].reason == "limit_exceeded"
    run(scenario())


def test_large_frame_within_the_limit_goes_through_websockets(redis_url, r):
    async def scenario():
        async with running(redis_url, max_frame_bytes=200_000) as (gw, client):
            p = await RawPlatform.open(gw, "call-64k")
            conn = await until(lambda: _conn(gw, "call-64k"), what="socket attached")
            big = pcm(7, 70_400)  # 220 frames, a 64-bit length
            await p.write(frame(pcm(1)) + frame(big) + frame(pcm(2)))
            await until(lambda: _audio_len(client, "call-64k", 320 + len(big) + 320),
                        what="the big frame")
            await p.write(frame(pcm(3)))
            want = pcm(1) + big + pcm(2) + pcm(3)
            await until(lambda: _audio_len(client, "call-64k", len(want)), what="all audio")
            assert await audio_of(client, "call-64k") == want
            assert conn.fast_frames >= 2  # before the big one, and after it
            await p.close()
    run(scenario())


def test_text_frame_header_for_every_length_class():
    assert text_frame(b"x" * 125) == b"\x81\x7d"
    assert text_frame(b"x" * 126) == b"\x81\x7e\x00\x7e"
    assert text_frame(b"x" * 65535) == b"\x81\x7e\xff\xff"
    assert text_frame(b"x" * 65536) == b"\x81\x7f" + (65536).to_bytes(8, "big")


def test_write_texts_reach_a_websockets_client_whole_and_in_order(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            async with connect(url(gw, "call-w"), compression=None) as ws:
                conn = await until(lambda: _conn(gw, "call-w"), what="socket attached")
                texts = ["a", "é" * 70, "x" * 200, "y" * 70_000, '{"action":"break"}']
                assert conn.write_state() == "open"
                conn.write_texts(texts[:3])
                await conn.send("between")         # the library's own send, in order
                conn.write_texts(texts[3:])
                got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(6)]
                assert got == texts[:3] + ["between"] + texts[3:]
                await ws.send(pcm(1))
                await until(lambda: _audio_len(client, "call-w", 320), what="audio")
    run(scenario())


def test_fragmented_message_switches_the_connection_to_the_library_for_good(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            p = await RawPlatform.open(gw, "call-frag")
            conn = await until(lambda: _conn(gw, "call-frag"), what="socket attached")
            await p.write(frame(pcm(1)) + frame(pcm(2)[:100], fin=False)
                          + frame(pcm(2)[100:], opcode=0x0) + frame(pcm(3)))
            await p.write(frame(pcm(4)))
            want = pcm(1) + pcm(2) + pcm(3) + pcm(4)
            await until(lambda: _audio_len(client, "call-frag", len(want)), what="all audio")
            assert await audio_of(client, "call-frag") == want
            assert conn.fast_frames == 1
            await p.close()
    run(scenario())
