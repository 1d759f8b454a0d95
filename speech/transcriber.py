"""The pure core of the transcriber role: one call's entries in, Transcripts out.

Theory of operation
-------------------
``CallTranscriber`` is fed the decoded entries of one call's stream, in order,
with their stream ids (``handle(entry_id, msg)``), and returns the
``contracts.Transcript`` entries to append. It does no I/O: the shell
(``speech.transcriber_role``) reads Redis, and appends what this returns
atomically with ``checkpoint()``.

Per audio frame: the VAD scores it, ``TurnDetector`` turns scores into
speech_start / speech_end, and only speech is decoded: at speech_start a
recognizer stream opens and gets the last ``preroll_ms`` of audio before the
onset plus the onset itself (kept in a small ring buffer), then the segment's
frames until speech_end, when ``finish()`` gives the final. Partials go out
as the engine produces them (at most every ~300 ms).

Quiet frames inside a segment (those the turn detector counts towards its
hangover) are held back, not decoded at once: if speech resumes they are
fed first (a pause inside a sentence reaches the recognizer whole); if the
hangover ends the turn, only the first ``tail_ms`` of them are fed before
``finish()`` (``TAIL_MS``, 200 ms, ``PV_ASR_TAIL_MS``: chosen by
measurement, a shorter tail cost intent accuracy; BENCHMARKS.md). The rest of the hangover (400 ms by
default) was decoded CPU that only gave the recognizer silence to explain.
Segment boundaries and times are the turn detector's, unchanged. A segment longer than
``max_segment_ms`` is closed and a new one starts (a caller who never pauses,
or a TV the VAD takes for a voice, cannot grow one without bound).

Times are call-audio time: the number of audio frames (plus frames reported
lost by ``gap`` entries) before the frame x 20 ms, so they line up with the
recordings. Segments are numbered from 0 per call; partials and the final of
one segment share the number.

Channel: ``caller`` until the worker's transfer is applied (a
``command.result`` of ``cmd.transfer`` with status ``applied``), then
``conversation`` (the monitored mix of the person and the human agent).

Takeover: ``checkpoint()`` is not "everything so far" but a *safe point*: the
stream id from which a new owner can replay and produce the same segments.
While nobody speaks, that is just before the pre-roll window; during a
segment it stays frozen at the segment's start, so a crash mid-utterance
re-decodes the whole utterance (partials may repeat; the final is appended
with the checkpoint that moves past it, so it appears exactly once). The VAD
restarts fresh at the safe point. Recognizer state is never checkpointed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from piopiy_voice.contracts import AudioFrame, CallEnded, CommandResult, StreamGap, Transcript

from .asr import Hyp, Recognizer, RecognizerStream
from .config import SpeechConfig
from .errors import SpeechError
from .turns import FRAME_MS, TurnDetector
from .vad import make_vad

log = logging.getLogger(__name__)

#: Silence fed after a segment's last speech frame before ``finish()`` (ms):
#: ``PV_ASR_TAIL_MS``'s default.
TAIL_MS: int = SpeechConfig.model_fields["asr_tail_ms"].default


@dataclass
class _Point:
    """What a new owner needs to resume exactly after ``entry_id``."""
    entry_id: str
    frames: int
    seq: int
    segment: int
    channel: str

    def as_dict(self) -> dict[str, Any]:
        return {"last_id": self.entry_id, "frames": self.frames, "seq": self.seq,
                "segment": self.segment, "channel": self.channel}


class CallTranscriber:
    def __init__(self, call_id: str, rate: int, recognizer: Recognizer, *, vad: str = "energy",
                 onset_ms: int = 80, hangover_ms: int = 400, preroll_ms: int = 200, lead_in_ms: int = 60,
                 tail_ms: int = TAIL_MS, max_segment_ms: int = 30_000,
                 state: dict[str, Any] | None = None) -> None:
        self.call_id = call_id
        self.rate = rate
        self.recognizer = recognizer
        self.engine = getattr(recognizer, "name", type(recognizer).__name__)
        self.vad = make_vad(vad, rate)
        self.turns = TurnDetector(onset_ms, hangover_ms, lead_in_ms=lead_in_ms)
        self.preroll_ms = int(preroll_ms)
        if tail_ms < 0:
            raise SpeechError(f"tail_ms must be >= 0, got {tail_ms}")
        self.tail_frames = int(tail_ms) // FRAME_MS
        self.max_segment_ms = int(max_segment_ms)
        # Quiet frames of the open segment not yet fed (see the module docstring).
        self._held: list[bytes] = []
        ring = (self.preroll_ms + onset_ms) // FRAME_MS + 1
        # (entry id, pcm, frames/seq/channel after it) of the newest frames.
        self._ring: deque[tuple[str, bytes, int, int, str]] = deque(maxlen=ring)
        st = state or {}
        try:
            self.frames = int(st.get("frames", 0))
            self.seq = int(st.get("seq", 0))
            self.segment = int(st.get("segment", 0))
            self.channel = str(st.get("channel", "caller"))
            last_id = str(st.get("last_id", "0-0"))
        except (TypeError, ValueError) as exc:
            raise SpeechError(f"bad transcriber checkpoint: {exc!r}") from None
        self._safe = _Point(last_id, self.frames, self.seq, self.segment, self.channel)
        self._stream: RecognizerStream | None = None
        self._seg_start_ms = 0
        self._seg_partials = 0
        self.ended = False
        self.failures = 0

    # ---------------------------------------------------------------- input
    def hear_ahead(self, frames: list[bytes], batch: Any) -> None:
        """The PCM of the audio entries about to be handled, for the VAD to
        score in ``batch`` (``speech.vad.VoicingBatch``); a speed hook only:
        a frame not scored ahead is scored when ``handle`` gets it."""
        if not self.ended:
            for pcm in frames:
                self.vad.ahead(pcm, batch)

    def handle(self, entry_id: str, msg: Any) -> list[Transcript]:
        if self.ended:
            return []
        seq = getattr(msg, "seq", 0)
        if seq > 0:
            if seq <= self.seq:
                return []  # duplicate (gateway resent after a reconnect)
            self.seq = seq
        out: list[Transcript] = []
        if isinstance(msg, AudioFrame):
            out = self._audio(entry_id, msg.pcm)
        elif isinstance(msg, StreamGap):
            self.frames += max(0, int(msg.frames))
        elif isinstance(msg, CommandResult):
            if msg.command == "cmd.transfer" and msg.status == "applied" and self.channel != "conversation":
                out = self._close_segment(self.frames * FRAME_MS)  # the caller's words end here
                self.turns = TurnDetector(self.turns.onset_ms, self.turns.hangover_ms, self.turns.threshold,
                                          self.turns.lead_in_ms)
                self.channel = "conversation"
        elif isinstance(msg, CallEnded):
            out = self._close_segment(self.frames * FRAME_MS)
            self.ended = True
        if self.ended:
            self._safe = _Point(entry_id, self.frames, self.seq, self.segment, self.channel)
        elif not self._in_segment():
            self._advance_safe(entry_id)
        return out

    def _in_segment(self) -> bool:
        return self._stream is not None or self.turns.in_turn

    def _advance_safe(self, entry_id: str) -> None:
        """Idle: the safe point trails the newest entry by the pre-roll window."""
        if self._ring.maxlen and len(self._ring) == self._ring.maxlen:
            eid, _pcm, frames, seq, channel = self._ring[0]
            self._safe = _Point(eid, frames, seq, self.segment, channel)
        elif not self._ring:
            self._safe = _Point(entry_id, self.frames, self.seq, self.segment, self.channel)

    def _audio(self, entry_id: str, pcm: bytes) -> list[Transcript]:
        t_ms = self.frames * FRAME_MS
        self.frames += 1
        try:
            prob = self.vad.speech_prob(pcm)
        except SpeechError:
            prob = 0.0  # a malformed frame (wrong size) is not speech
        out: list[Transcript] = []
        events = self.turns.feed(prob, t_ms)
        if self._stream is not None:
            if events or self.turns.in_hangover:
                self._held.append(pcm)   # a hangover frame (or the one that ended the turn)
            else:
                out += self._feed_held()
                out += self._feed(pcm)
        self._ring.append((entry_id, pcm, self.frames, self.seq, self.channel))
        for ev in events:
            if ev.kind == "speech_start":
                out += self._open_segment(ev.t_ms)
            else:
                out += self._close_segment(ev.t_ms)
        if self._stream is not None and self.frames * FRAME_MS - self._seg_start_ms >= self.max_segment_ms:
            out += self._close_segment(self.frames * FRAME_MS)
            out += self._open_segment(self.frames * FRAME_MS, preroll=False)
        return out

    # -------------------------------------------------------------- segments
    def _open_segment(self, onset_ms: int, preroll: bool = True) -> list[Transcript]:
        start = max(0, onset_ms - self.preroll_ms) if preroll else onset_ms
        self._seg_start_ms = start
        self._seg_partials = 0
        try:
            self._stream = self.recognizer.open(self.rate)
        except SpeechError as exc:
            self._fail(exc)
            return []
        out: list[Transcript] = []
        if preroll:
            # Ring frames from the pre-roll start on (the newest frame included).
            first = len(self._ring) - (self.frames - start // FRAME_MS)
            for _eid, pcm, *_ in list(self._ring)[max(0, first):]:
                out += self._feed(pcm)
        return out

    def _feed(self, pcm: bytes) -> list[Transcript]:
        assert self._stream is not None
        try:
            hyps = self._stream.feed(pcm)
        except SpeechError as exc:
            self._fail(exc)
            return []
        end = self.frames * FRAME_MS
        out = []
        for h in hyps:
            if h.final:
                continue  # finals only come from finish(): one per segment
            self._seg_partials += 1
            out.append(self._transcript(h, end))
        return out

    def _feed_held(self, limit: int | None = None) -> list[Transcript]:
        held, self._held = self._held[:limit], []
        out: list[Transcript] = []
        for pcm in held:
            if self._stream is None:
                break   # the recognizer failed
            out += self._feed(pcm)
        return out

    def _close_segment(self, end_ms: int) -> list[Transcript]:
        if self._stream is None:
            return []
        out = self._feed_held(self.tail_frames)
        stream, self._stream = self._stream, None
        if stream is None:
            return out
        try:
            hyp = stream.finish()
        except SpeechError as exc:
            self._fail(exc)
            hyp = Hyp("", True)
        if hyp.text or self._seg_partials:
            out.append(self._transcript(Hyp(hyp.text, True, hyp.confidence), max(end_ms, self._seg_start_ms)))
            self.segment += 1
        return out

    def _fail(self, exc: Exception) -> None:
        self.failures += 1
        self._held = []
        log.warning("call %s: recognizer %s failed: %s", self.call_id, self.engine, exc)
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:  # noqa: BLE001
                pass
            self._stream = None

    def _transcript(self, h: Hyp, end_ms: int) -> Transcript:
        return Transcript(call_id=self.call_id, seq=0, channel=self.channel, segment=self.segment,
                          text=h.text, final=h.final, start_ms=self._seg_start_ms, end_ms=end_ms,
                          confidence=h.confidence, engine=self.engine)

    # ---------------------------------------------------------------- state
    def checkpoint(self) -> dict[str, Any]:
        """The safe point (see the module docstring), JSON-able."""
        return self._safe.as_dict()

    def close(self) -> None:
        """Abandon an open segment without a result (lease lost, shutdown)."""
        self._held = []
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:  # noqa: BLE001
                pass
            self._stream = None
