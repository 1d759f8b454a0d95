"""What a sandbox call leaves behind: a JSON timeline and WAV recordings.

Layout of ``<report_dir>/<request_id>/``:

``timeline.json``
    ``request_id``, ``status``, ``end_reason``, call parameters, a ``stream``
    summary (frames sent, contiguous ``runs`` of frames, ``paused_ranges``,
    close code), ``received`` (counts of what the app sent on the socket by
    kind), ``playout`` (ms received / played / cut), ``malformed`` messages,
    and ``events``: every event both ways, in order, each with ``t_ms``
    (milliseconds since the call was created, from a monotonic clock), ``src``
    (api, platform, gateway, caller, human) and ``event``.
``caller.wav``
    What the platform sent up the media stream (caller, plus the human when
    bridged and listen_mode asks for it), at its real time position; silence
    where nothing was sent (paused, stopped, not yet connected).
``agent.wav``
    What the caller heard: streamAudio, music, speak, the human's voice.
``call.wav``
    Stereo, left = everything said on the caller's side (whether streamed or
    not), right = what the caller heard. For listening to a call.

All three share one clock: sample ``n`` of each is the same instant.
"""

from __future__ import annotations

import json
import os
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from piopiy_voice.audio import write_wav


class Timeline:
    """Ordered events with monotonic-relative timestamps."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.started_at = time.time()
        self.events: list[dict[str, Any]] = []

    def now_ms(self) -> float:
        return round((time.monotonic() - self.t0) * 1000.0, 1)

    def add(self, src: str, event: str, **detail: Any) -> dict[str, Any]:
        entry = {"t_ms": self.now_ms(), "src": src, "event": event, **detail}
        self.events.append(entry)
        return entry


class Tracks:
    """Per-tick audio of the three tracks; index ``n`` is clock tick ``n``."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.sent = bytearray()
        self.heard = bytearray()
        self.side = bytearray()

    def append(self, *, sent: bytes, heard: bytes, side: bytes) -> None:
        self.sent += sent
        self.heard += heard
        self.side += side

    def write(self, directory: Path) -> dict[str, str]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "caller": directory / "caller.wav",
            "agent": directory / "agent.wav",
            "call": directory / "call.wav",
        }
        write_wav(str(paths["caller"]), bytes(self.sent), self.rate)
        write_wav(str(paths["agent"]), bytes(self.heard), self.rate)
        left = np.frombuffer(bytes(self.side), dtype="<i2")
        right = np.frombuffer(bytes(self.heard), dtype="<i2")
        n = min(len(left), len(right))
        stereo = np.empty(2 * n, dtype="<i2")
        stereo[0::2] = left[:n]
        stereo[1::2] = right[:n]
        with wave.open(str(paths["call"]), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(self.rate)
            w.writeframes(stereo.tobytes())
        return {k: str(v) for k, v in paths.items()}


def write_report(directory: Path, report: dict[str, Any]) -> str:
    """Write ``timeline.json`` atomically (a reader never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "timeline.json"
    tmp = directory / "timeline.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def load_report(report_dir: str | Path, request_id: str) -> dict[str, Any]:
    """Read a finished call's ``timeline.json``; ``FileNotFoundError`` if there is none."""
    path = Path(report_dir) / request_id / "timeline.json"
    return json.loads(path.read_text(encoding="utf-8"))
