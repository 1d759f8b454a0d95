"""What the caller hears from the platform side: media library, playout queue, options.

``MediaLibrary`` decides which ``file_name`` values exist (the REST 404 check)
and what they sound like; ``Playout`` is the queue of app audio, music and
speak that the call's clock drains one 20 ms frame per tick, so that
``break`` can drop exactly what has not been heard yet. ``PlatformOptions``
(the emulated platform's knobs) lives here because the media rules use it.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from piopiy_voice.audio import frame_bytes, read_wav, resample, silence, tone

AUDIO_EXTENSIONS = (".wav", ".mp3", ".ogg", ".gsm", ".ulaw", ".alaw")


@dataclass(frozen=True)
class PlatformOptions:
    """Knobs of the emulated platform (not of the PCMO)."""

    ring_ms: int = 300
    connect_timeout_s: float = 5.0
    #: Folders whose audio files are "uploaded" to the app's media library.
    media_dirs: tuple[Path, ...] = (Path(__file__).resolve().parent / "media",)
    #: Strict: only files in media_dirs are known (else 404). Lenient: any plain
    #: file name with an audio extension is known and played as synthesized music.
    strict_media: bool = False
    music_ms: int = 3000
    #: espeak-ng voice of the ``speak`` action.
    speak_voice: str = "en-us"
    #: Length of the speech-like stand-in when ``speak`` cannot be synthesized.
    speak_ms_per_char: int = 60
    ws_max_size: int = 4 * 1024 * 1024
    #: Also send JSON text events on the socket ({"event": "start"|"dtmf"|"stop", ...}). The
    #: platform's text frames are undocumented; this exercises the app's tolerance of them.
    text_events: bool = False


class MediaLibrary:
    """Which ``file_name`` values exist, and the audio they play."""

    def __init__(self, options: PlatformOptions) -> None:
        self.options = options

    def find(self, name: str) -> Path | None:
        if "/" in name or "\\" in name or name.startswith("."):
            return None
        for folder in self.options.media_dirs:
            path = Path(folder) / name
            if path.is_file():
                return path
        return None

    def known(self, name: str) -> bool:
        if self.find(name) is not None:
            return True
        return (not self.options.strict_media and "/" not in name and "\\" not in name
                and name.lower().endswith(AUDIO_EXTENSIONS))

    def audio(self, *, file_name: str | None, file_url: str | None, rate: int) -> tuple[bytes, str]:
        """PCM at ``rate`` for a play action, and where it came from."""
        if file_name:
            path = self.find(file_name)
            if path is not None and path.suffix.lower() == ".wav":
                pcm, src = read_wav(str(path))
                return (resample(pcm, src, rate) if src != rate else pcm), str(path)
        seed = zlib.crc32((file_name or file_url or "").encode())
        return synth_music(self.options.music_ms, rate, seed), "synthesized"


def synth_music(ms: int, rate: int, seed: int = 0) -> bytes:
    """A short arpeggio standing in for a music file we cannot fetch or decode."""
    notes = (440.0, 554.4, 659.3, 880.0)
    out = bytearray()
    i = seed % len(notes)
    while len(out) < ms * rate * 2 // 1000:
        out += tone(notes[i % len(notes)], 250, rate, 0.15)
        i += 1
    return bytes(out[: (ms * rate * 2 // 1000) & ~1])


@dataclass
class Segment:
    source: str
    pcm: bytes
    label: str | None = None
    done: asyncio.Future | None = None
    pos: int = 0


class Playout:
    """What the caller will hear from the app side, consumed at real time."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.frame = frame_bytes(rate)
        self.queue: deque[Segment] = deque()
        self.played_bytes = 0
        self.cut_bytes = 0

    def push(self, seg: Segment) -> None:
        self.queue.append(seg)

    @property
    def queued_ms(self) -> int:
        return sum(len(s.pcm) - s.pos for s in self.queue) * 1000 // (2 * self.rate)

    def next_frame(self, on_start: Callable[[Segment], None], on_end: Callable[[Segment], None]) -> bytes | None:
        if not self.queue:
            return None
        seg = self.queue[0]
        end = seg.pos + self.frame
        if seg.pos and end < len(seg.pcm):  # mid-segment, the common tick: one slice
            seg.pos = end
            self.played_bytes += self.frame
            return seg.pcm[end - self.frame: end]
        out = bytearray()
        while self.queue and len(out) < self.frame:
            seg = self.queue[0]
            if seg.pos == 0:
                on_start(seg)
            take = seg.pcm[seg.pos: seg.pos + self.frame - len(out)]
            seg.pos += len(take)
            out += take
            if seg.pos >= len(seg.pcm):
                self.queue.popleft()
                on_end(seg)
                if seg.done and not seg.done.done():
                    seg.done.set_result("played")
        self.played_bytes += len(out)
        if len(out) < self.frame:
            out += b"\x00" * (self.frame - len(out))
        return bytes(out)

    def clear(self) -> tuple[int, list[str]]:
        cut = sum(len(s.pcm) - s.pos for s in self.queue)
        sources = [s.label or s.source for s in self.queue]
        for seg in self.queue:
            if seg.done and not seg.done.done():
                seg.done.set_result("cut")
        self.queue.clear()
        self.cut_bytes += cut
        return cut * 1000 // (2 * self.rate), sources


def hold_tone(rate: int) -> bytes:
    """Two soft beeps a second: what a caller on hold hears."""
    beep = tone(480.0, 200, rate, 0.1)
    return beep + silence(300, rate) + beep + silence(300, rate)
