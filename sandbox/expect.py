"""What the app heard and said on a call, and a scenario's ``expect`` checked against it.

The sandbox plays the platform, so it only hears audio. The words are on the
app's side, in Redis:

* what the app *heard*: the final ``Transcript`` entries the transcriber role
  appended to the call's transcript (``keys.call_transcript``), channel ``caller``
  before a hand-off and ``conversation`` (the monitored person + human) after;
* what the agent *said*: the ``text`` of every ``PlayAudio``/``Speak`` the
  gateway applied, from its timeline notes (``command.play_audio``,
  ``command.speak`` on ``keys.call_timeline``); a ``command.interrupt`` marks
  where the agent was cut off.

``read_call_words`` (I/O) collects them as ``Line`` objects in the order they
were written (Redis entry time for transcripts, the note's time for commands:
a reply is always noted after the words it answers). ``check_expectations``
(pure) matches each expected phrase as a case-insensitive substring of that
side's texts joined with spaces; punctuation and repeated spaces are ignored
on both sides, because recognizers differ in what they emit (pocketsphinx
gives bare lower-case words). ``ExpectResult`` is what tests assert on and
what the demo prints.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from piopiy_voice import callrecord, keys

from .scenario import Expectations

#: Timeline notes of commands whose ``text`` is what the agent said.
SPOKEN_COMMANDS = ("command.play_audio", "command.speak")
_NOT_WORD = re.compile(r"[^\w']+")


@dataclass(frozen=True)
class Line:
    t: float            # wall-clock seconds when it was written to Redis
    who: str            # "caller" | "conversation" | "agent" | "interrupt"
    text: str = ""
    start_ms: int | None = None   # transcripts: call-audio time of the segment


@dataclass
class CallWords:
    """Both sides of one call in words, in the order they were written."""

    lines: list[Line] = field(default_factory=list)

    def texts(self, who: str) -> list[str]:
        return [ln.text for ln in self.lines if ln.who == who and ln.text]

    @property
    def caller(self) -> list[str]:
        return self.texts("caller")

    @property
    def agent(self) -> list[str]:
        return self.texts("agent")

    @property
    def conversation(self) -> list[str]:
        return self.texts("conversation")


@dataclass(frozen=True)
class Check:
    side: str           # "heard" | "said" | "conversation"
    phrase: str
    met: bool


@dataclass
class ExpectResult:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.met for c in self.checks)

    @property
    def missing(self) -> list[str]:
        return [f"{c.side}: {c.phrase!r}" for c in self.checks if not c.met]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def normalize(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.lower().replace("\u2019", "'")).split())


def contains(texts: list[str], phrase: str) -> bool:
    """``phrase`` is a case-insensitive substring of ``texts`` joined by spaces."""
    return normalize(phrase) in normalize(" ".join(texts))


def check_expectations(expect: Expectations, words: CallWords) -> ExpectResult:
    sides = (("heard", expect.heard, words.caller), ("said", expect.said, words.agent),
             ("conversation", expect.conversation, words.conversation))
    return ExpectResult([Check(side, phrase, contains(texts, phrase))
                         for side, phrases, texts in sides for phrase in phrases])


# ------------------------------------------------------------------ Redis

def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def read_call_words(r: Any, call_id: str) -> CallWords:
    """Final transcripts and the agent's spoken texts of ``call_id``, in order."""
    lines: list[Line] = []
    for entry_id, msg in callrecord.transcript_finals(r.xrange(keys.call_transcript(call_id))):
        if msg.text.strip():
            lines.append(Line(keys.entry_ms(entry_id) / 1000, msg.channel, msg.text.strip(), msg.start_ms))
    for _, fields in r.xrange(keys.call_timeline(call_id)):
        f = {_s(k): _s(v) for k, v in fields.items()}
        event = f.get("event", "")
        if event in SPOKEN_COMMANDS and f.get("text"):
            lines.append(Line(float(f.get("t", 0)), "agent", f["text"]))
        elif event == "command.interrupt":
            lines.append(Line(float(f.get("t", 0)), "interrupt"))
    lines.sort(key=lambda ln: ln.t)
    return CallWords(lines)


def wait_transcribed(r: Any, call_id: str, timeout: float = 15.0) -> bool:
    """Wait until the transcriber has finished the call (its checkpoint says done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.hget(keys.call_asr_checkpoint(call_id), "done") == b"1":
            return True
        time.sleep(0.1)
    return False


# ------------------------------------------------------------------ text

_LABELS = {"caller": "caller", "agent": "agent", "conversation": "on the line"}


def format_words(words: CallWords) -> list[str]:
    """One line per utterance, both sides interleaved."""
    if not words.lines:
        return ["  (no words: no transcripts and no spoken commands)"]
    t0 = words.lines[0].t
    out = []
    for ln in words.lines:
        if ln.who == "interrupt":
            out.append(f"  {ln.t - t0:6.1f}s  {'agent':<11}  -- cut off by the caller (break) --")
        else:
            out.append(f"  {ln.t - t0:6.1f}s  {_LABELS.get(ln.who, ln.who):<11}  {ln.text}")
    return out


def format_result(result: ExpectResult) -> list[str]:
    if not result.checks:
        return ["  (the scenario expects nothing)"]
    names = {"heard": "heard", "said": "said", "conversation": "heard on the line"}
    return [f"  {'ok ' if c.met else 'MISSING'}  {names[c.side]} {c.phrase!r}" for c in result.checks]
