"""Barge-in latency on one worker while every call's model takes 1 s to answer.

    .venv/bin/python bench/bargein_bench.py [--calls 100] [--seconds 40] [--warmup 8]
        [--model-delay 1.0] [--rate 8000] [--workers 1]

One worker process (``LlmAgent``) against the fake OpenAI-compatible server of
``tests/fake_openai.py`` (its own process; every reply's first token after
``--model-delay`` s, then a three-sentence answer of ~9 s of speech,
synthesized by espeak in the worker's agent runtime), a private redis-server,
and the fake gateway of ``bench/callsim.py`` (no real gateway: it writes the
frames and the ``Transcript`` finals into the call streams and reads the
commands, which isolates the worker).

Each caller asks a question (espeak speech), the bench writes the segment's
final transcript 200 ms after the end of speech (as the transcriber would);
the agent asks the model (1 s), then speaks; 0.3-1.2 s after its first
sentence reaches the gateway stream, the caller talks over it (espeak
speech): a barge-in, which is also the next question. Measured, after the
warm-up: speech onset (the entry time of the caller's first speech frame) ->
``cmd.interrupt`` in the gateway's command stream (its entry time: when a
real gateway would read it and send ``break``), p50/p95/p99/max; this
includes the time the turn detector needs on that audio (computed offline
for each utterance: the VAD must hear ``PV_TURN_ONSET_MS``, 80 ms, of loud
speech, of which at most ``PV_TURN_LEAD_IN_MS``, 60 ms, may be the unvoiced
consonant before the first vowel), shown separately with the rest (worker +
Redis). Also the worker's stream lag (entry time -> processed, from its
``/lag``), its CPU, and question end -> first reply audio.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

from callsim import Caller, Gateway, System, pct, speech_frames

from piopiy_voice.speech.tts import EspeakSynthesizer

QUESTIONS = ["what are your opening hours", "where is my order", "can you repeat that",
             "i have a problem with my card"]
BARGES = ["wait, I have another question", "sorry, can you tell me something else",
          "hold on, what about the weekend"]
REPLY = ("We are open from nine in the morning to six in the evening, Monday to Friday. "
         "On Saturdays we open at ten and close at four in the afternoon. "
         "Is there anything else I can help you with today?")


def vad_delay_ms(frames: list[bytes], first: int, rate: int, onset_ms: int, lead_in_ms: int = 60) -> int:
    """When the call's turn detector (default energy VAD, after 2 s of silence)
    fires ``speech_start`` on this utterance: ms from the arrival of its first
    speech frame to the arrival of the frame that fires it (frames arrive
    every 20 ms). The floor of any system's barge-in latency on this audio."""
    from piopiy_voice.speech.turns import TurnDetector
    from piopiy_voice.speech.vad import make_vad

    vad, turns = make_vad("energy", rate), TurnDetector(onset_ms=onset_ms, lead_in_ms=lead_in_ms)
    for i in range(100):
        turns.feed(vad.speech_prob(bytes(len(frames[0]))), i * 20)
    for i, f in enumerate(frames):
        if turns.feed(vad.speech_prob(f), 2000 + i * 20):
            return (i - first) * 20
    return -1


class BargeCaller(Caller):
    def __init__(self, call_id: str, rate: int, speech: dict, rng: random.Random) -> None:
        super().__init__(call_id, rate)
        self.speech = speech
        self.rng = rng
        self.state = "start"
        self.pause(rng.uniform(0.5, 3.0))
        self.n = 0
        self.last_end_ms = 0
        self.end_wall = 0.0
        self.reply_wall: float | None = None
        self.barge_at: float | None = None
        self.onsets: list[tuple[int, str, str]] = []   # (t_ms, kind, text)
        self.interrupts: list[int] = []
        self.reply_ms: list[tuple[int, int]] = []   # (question end, first reply audio)
        self.no_reply = 0
        self.apologies = 0   # the "trouble" prompt: a reply failed
        self.reply_parts = 0   # reply sentences sent (PlayAudio or Speak), the whole run

    def _speak(self, kind: str) -> None:
        text = self.rng.choice(QUESTIONS if kind == "ask" else BARGES)
        frames, first, last = self.speech[text]
        self.n += 1
        self.say(frames, first, last, f"{kind}:{self.n}:{text}")
        self.state = "talking"
        self.reply_wall = self.barge_at = None

    def idle(self, now: float) -> None:
        if self.state == "start":
            self._speak("ask")
        elif self.state == "waiting":
            if self.barge_at is not None and now >= self.barge_at:
                self._speak("barge")
            elif self.reply_wall is None and now - self.end_wall > 6.0:
                self.no_reply += 1
                self._speak("ask")

    def on_mark(self, mark: str, t_ms: int, now: float) -> None:
        kind, _, rest = mark.partition(":")
        if kind == "onset":
            kind, _, text = rest.split(":", 2)
            self.onsets.append((t_ms, kind, text))
        else:
            self.last_end_ms, self.end_wall = t_ms, now
            self.state = "waiting"
            text = rest.split(":", 2)[2]
            self.transcripts.append((now + 0.2, text))

    def on_command(self, cmd, t_ms: int) -> None:
        if cmd.type == "cmd.interrupt":
            self.interrupts.append(t_ms)
        elif ":trouble:" in getattr(cmd, "utterance_id", ""):
            self.apologies += 1
        elif cmd.type in ("cmd.play_audio", "cmd.speak") and ":say:" in getattr(cmd, "utterance_id", ":say:"):
            self.reply_parts += 1
            if self.state == "waiting" and self.reply_wall is None and t_ms >= self.last_end_ms:
                import time
                self.reply_wall = time.time()
                self.reply_ms.append((self.last_end_ms, t_ms))
                self.barge_at = self.reply_wall + self.rng.uniform(0.3, 1.2)


#: A barge-in that began this close to the end of the run may still have had
#: its interrupt on the way when the fake gateway stopped reading: not a miss.
CUT_OFF_MS = 1000


def measure(callers: list[BargeCaller], since_ms: int, until_ms: int, floor: dict[str, int]
            ) -> tuple[list[int], list[int], int, int, list[int]]:
    """(latencies, beyond the VAD floor, missed, cut off by the run's end, reply times)."""
    lat, beyond, missed, cut_off, reply = [], [], 0, 0, []
    for cl in callers:
        onsets = sorted(cl.onsets)
        for i, (t_on, kind, text) in enumerate(onsets):
            if kind != "barge" or t_on < since_ms:
                continue
            nxt = onsets[i + 1][0] if i + 1 < len(onsets) else 1 << 62
            hits = [t for t in cl.interrupts if t_on <= t < nxt]
            if hits:
                lat.append(hits[0] - t_on)
                beyond.append(hits[0] - t_on - floor[text])
            elif t_on > until_ms - CUT_OFF_MS:
                cut_off += 1
            else:
                missed += 1
        reply += [r - e for e, r in cl.reply_ms if e >= since_ms]
    return lat, beyond, missed, cut_off, reply


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=40.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--model-delay", type=float, default=1.0, help="first-token delay of the fake model (s)")
    ap.add_argument("--rate", type=int, default=8000, choices=(8000, 16000))
    ap.add_argument("--onset-ms", type=int, default=80, help="PV_TURN_ONSET_MS for the worker")
    ap.add_argument("--lead-in-ms", type=int, default=60, help="PV_TURN_LEAD_IN_MS for the worker")
    ap.add_argument("--workers", type=int, default=1, help="worker processes sharing the calls")
    ap.add_argument("--tts", default="espeak", choices=("espeak", "platform"),
                    help="the worker's synthesizer (platform: Speak commands, no synthesis in the worker)")
    args = ap.parse_args(argv)

    synth = EspeakSynthesizer()
    speech = {t: speech_frames(synth.synthesize_sync(t, args.rate), args.rate) for t in QUESTIONS + BARGES}
    floor = {t: vad_delay_ms(fr, first, args.rate, args.onset_ms, args.lead_in_ms)
             for t, (fr, first, _) in speech.items()}
    load0 = os.getloadavg()[0]
    system = System("piopiy_voice.workers.agent.llm:LlmAgent",
                    {"PV_TURN_ONSET_MS": str(args.onset_ms), "PV_TURN_LEAD_IN_MS": str(args.lead_in_ms),
                     "PV_TTS": args.tts},
                    llm_delay_s=args.model_delay, llm_text=REPLY, workers=args.workers)
    callers = [BargeCaller(f"barge-{os.getpid()}-{i}", args.rate, speech, random.Random(i))
               for i in range(args.calls)]
    gw = Gateway(system, callers)
    try:
        gw.start_calls()
        marks = gw.run_measured(args.warmup, args.seconds)
        lag, usage, window = marks["lag"], marks["usage"], args.seconds
    finally:
        gw.stop()
        system.close()
    lat, beyond, missed, cut_off, reply = measure(callers, marks["since"], marks["until"], floor)
    workers = [n for n in usage if n.startswith("worker")]
    cpu = sum(usage[n][0] - marks["usage0"][n][0] for n in workers)
    loop_cpu = sum(usage[n][2] - marks["usage0"][n][2] for n in workers)
    child_cpu = sum(usage[n][3] - marks["usage0"][n][3] for n in workers)
    print(f"barge-in bench: {args.calls} calls @ {args.rate} Hz on {args.workers} worker(s) (LlmAgent, {args.tts}), fake model "
          f"first token after {args.model_delay:g} s, fake gateway on Redis; {args.seconds:.0f} s window "
          f"(+{args.warmup:.0f} s warm-up); load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    if lat:
        print(f"  barge-in onset -> interrupt command: n={len(lat)} missed={missed} (+{cut_off} begun in the "
              f"run's last {CUT_OFF_MS} ms, unanswered when it stopped)  p50 {pct(lat, 50):.0f}  "
              f"p95 {pct(lat, 95):.0f}  p99 {pct(lat, 99):.0f}  max {max(lat):.0f} ms")
        print(f"    the turn detector alone on the same audio (onset {args.onset_ms} ms, lead-in "
              f"{args.lead_in_ms} ms) fires after "
              + ", ".join(f"{v} ms" for v in sorted(set(floor[t] for t in BARGES)))
              + f"; beyond that (worker + Redis): p50 {pct(beyond, 50):.0f}  p95 {pct(beyond, 95):.0f}  "
              f"p99 {pct(beyond, 99):.0f}  max {max(beyond):.0f} ms")
    else:
        print(f"  no barge-in measured (missed {missed})")
    if reply:
        print(f"  question end -> first reply audio (model {args.model_delay:g} s): n={len(reply)}  "
              f"p50 {pct(reply, 50):.0f}  p95 {pct(reply, 95):.0f}  p99 {pct(reply, 99):.0f} ms")
    print(f"  worker stream lag ms: p50 {lag['p50'] * 1000:.1f}  p99 {lag['p99'] * 1000:.1f}  "
          f"max {lag['max'] * 1000:.1f} (n={lag['n']})")
    print(f"  worker CPU {100 * cpu / window:.0f}% of a core (loop thread {100 * loop_cpu / window:.0f}%, "
          f"agent runtime + synthesis threads {100 * (cpu - loop_cpu) / window:.0f}%), "
          f"RSS {sum(usage[n][1] for n in workers):.0f} MB" + (" (all workers)" if len(workers) > 1 else ""))
    print(f"  synthesis child processes: {100 * child_cpu / window:.0f}% of a core; PlayAudio/Speak "
          f"commands for replies: {sum(c.reply_parts for c in callers)}")
    print(f"  questions without a reply in 6 s: {sum(c.no_reply for c in callers)}; replies that "
          f"failed (the \"trouble\" apology): {sum(c.apologies for c in callers)}")
    if gw.late_ticks:
        print(f"  note: the fake gateway fell behind real time on {gw.late_ticks} ticks")
    ok = bool(lat) and pct(lat, 99) <= 150 and lag["p99"] <= 0.100
    print(f"  targets barge-in p99 <= 150 ms, lag p99 <= 100 ms: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
