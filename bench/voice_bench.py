"""Voice-to-voice latency of the offline stack, and intent accuracy of the default agent.

    .venv/bin/python bench/voice_bench.py latency [--calls 25] [--seconds 40] [--warmup 10]
        [--agent default|llm] [--model-delay 0.3] [--transcribers 1] [--rate 8000]
    .venv/bin/python bench/voice_bench.py intents

``latency``: a private redis-server, one worker process (``DefaultAgent``:
intents + espeak; or ``--agent llm``: ``LlmAgent`` against the fake model of
``tests/fake_openai.py`` answering after ``--model-delay`` s, espeak), real
transcriber processes (``piopiy-voice transcriber``: VAD + pocketsphinx, domain
LM) and the fake gateway of ``bench/callsim.py`` (frames into the call
streams, commands read back; no real gateway). Each caller waits for the
greeting to finish, says a question (espeak speech, one of the phrases
below, none of which hands off or says goodbye), waits for the whole answer
to play out, pauses 0.6-1.5 s, asks the next. Voice-to-voice = the entry
time of the caller's last speech frame -> the entry time of the first
``PlayAudio`` the agent sends after it (the gateway would start playing it
then): p50/p95 over the turns after the warm-up, split by what answered (a
synthesized reply, or the shipped "sorry" prompt when the recognizer heard
nothing usable). Also CPU (% of a core) and RSS of the worker and each
transcriber, per talking call.

``intents``: no Redis. Each phrase (with its expected intent) is spoken by 4
espeak voices at 8 and 16 kHz, run through the transcriber's per-call core
(``speech.transcriber.CallTranscriber``: VAD, segmenting, pocketsphinx with
the domain LM) and the finals classified by ``workers.agent.intents.classify``.
Reports word error rate, intent accuracy (on the reference text, i.e. the
rules alone, and on what the recognizer heard), and recognition CPU.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from asr_bench import wer_counts  # one word-error counter for the benches
from callsim import Caller, Gateway, System, pct, speech_frames

from piopiy_voice.speech.tts import EspeakSynthesizer

#: (phrase, expected intent). The first 20 are bench/asr_bench.py's test phrases.
PHRASES: list[tuple[str, str]] = [
    ("i want to speak to a real person", "handoff"),
    ("what are your opening hours", "hours"),
    ("what is my account balance", "other"),
    ("where is my order", "order_status"),
    ("yes that is correct", "other"),
    ("no thank you", "goodbye"),
    ("can you repeat that", "other"),
    ("thank you goodbye", "goodbye"),
    ("i forgot my password", "other"),
    ("are you open on sunday", "hours"),
    ("hello i want to check my order", "order_status"),
    ("can i talk to an operator please", "handoff"),
    ("what time do you open tomorrow", "hours"),
    ("i have a problem with my card", "other"),
    ("no i want a human", "handoff"),
    ("yes i would like to pay my bill", "other"),
    ("my card was lost", "other"),
    ("are you open this evening", "hours"),
    ("i need to speak to an agent about my order", "handoff"),
    ("good morning i have a question about my balance", "greeting"),
    ("hello", "greeting"),
    ("what can you do", "capabilities"),
    ("thank you very much", "thanks"),
    ("can you help me", "capabilities"),
    ("i want to track my order", "order_status"),
    ("put me through to customer service", "handoff"),
    ("that is all bye", "goodbye"),
    ("when do you close on saturday", "hours"),
]
VOICES = [("en-us", 160, 50), ("en", 175, 40), ("en-us+f3", 150, 60), ("en-gb-scotland", 170, 45)]
#: Phrases a latency caller says: the call goes on after them.
ASKING = [p for p, intent in PHRASES if intent not in ("handoff", "goodbye")]
AGENTS = {"default": "piopiy_voice.workers.agent.default:DefaultAgent",
          "llm": "piopiy_voice.workers.agent.llm:LlmAgent"}
LLM_REPLY = "We are open from nine to six, Monday to Friday. Anything else?"


class AskingCaller(Caller):
    def __init__(self, call_id: str, rate: int, speech: dict, rng: random.Random) -> None:
        super().__init__(call_id, rate)
        self.speech, self.rng = speech, rng
        self.busy_until = float("inf")   # the agent's audio plays until (wall); inf: greeting not yet seen
        self.state = "greeting"
        self.end_ms = 0
        self.end_wall = 0.0
        self.turns: list[tuple[int, int, str]] = []   # (speech end, first audio, what answered)
        self.no_reply = 0
        self.handoffs = 0
        self.next_at = 0.0

    def idle(self, now: float) -> None:
        if self.state == "greeting" and now >= self.busy_until + 0.5:
            self._ask()
        elif self.state == "answered" and now >= max(self.busy_until, self.next_at):
            self._ask()
        elif self.state == "waiting" and now - self.end_wall > 8.0:
            self.no_reply += 1
            self._ask()

    def _ask(self) -> None:
        text = self.rng.choice(ASKING)
        voice = self.rng.randrange(len(VOICES))
        frames, first, last = self.speech[(text, voice)]
        self.say(frames, first, last, text)
        self.state = "talking"

    def on_mark(self, mark: str, t_ms: int, now: float) -> None:
        if mark.startswith("end:"):
            self.end_ms, self.end_wall, self.state = t_ms, now, "waiting"

    def on_command(self, cmd, t_ms: int) -> None:
        if cmd.type in ("cmd.transfer", "cmd.hangup"):
            # The recogniser heard a request for a person (or a goodbye): the
            # call is over for this bench; the caller redials.
            self.handoffs += cmd.type == "cmd.transfer"
            self.finished = True
            return
        if cmd.type != "cmd.play_audio":
            return
        now = time.time()
        dur = len(cmd.pcm) / 2 / cmd.rate
        self.busy_until = max(self.busy_until if self.busy_until != float("inf") else 0, now) + dur
        if self.state == "waiting" and t_ms >= self.end_ms:
            what = cmd.utterance_id.split(":")[-2]   # "<call>:say:<n>" or "<call>:<prompt>:<n>"
            self.turns.append((self.end_ms, t_ms, what))
            self.state = "answered"
            self.next_at = now + self.rng.uniform(0.6, 1.5)
        elif self.state == "answered":
            self.next_at = self.busy_until + self.rng.uniform(0.6, 1.5)


def latency(args: argparse.Namespace) -> int:
    synth = {v: EspeakSynthesizer(*VOICES[v]) for v in range(len(VOICES))}
    speech = {(t, v): speech_frames(synth[v].synthesize_sync(t, args.rate), args.rate)
              for t in ASKING for v in range(len(VOICES))}
    load0 = os.getloadavg()[0]
    system = System(AGENTS[args.agent], {"PV_TTS": "espeak"}, transcribers=args.transcribers,
                    llm_delay_s=args.model_delay if args.agent == "llm" else None, llm_text=LLM_REPLY)
    callers = [AskingCaller(f"v2v-{os.getpid()}-{i}", args.rate, speech, random.Random(i))
               for i in range(args.calls)]
    redials = [0]

    def redial(old: AskingCaller) -> AskingCaller:
        redials[0] += 1
        return AskingCaller(f"{old.call_id}-r{redials[0]}", args.rate, speech, old.rng)

    gw = Gateway(system, callers, redial=redial)
    try:
        idle = system.usage()
        gw.start_calls()
        marks = gw.run_measured(args.warmup, args.seconds)
        lag, usage = marks["lag"], marks["usage"]
    finally:
        gw.stop()
        system.close()
    since = marks["since"]
    callers = gw.all_callers()
    turns = [(e, a, w) for cl in callers for e, a, w in cl.turns if e >= since]
    said = [a - e for e, a, w in turns if w == "say"]
    sorry = [a - e for e, a, w in turns if w == "sorry"]
    allv = [a - e for e, a, w in turns]
    print(f"voice-to-voice bench: {args.calls} calls @ {args.rate} Hz, agent {args.agent}"
          + (f" (fake model first token after {args.model_delay:g} s)" if args.agent == "llm" else "")
          + f", espeak, {args.transcribers} transcriber process(es), 1 worker, fake gateway on Redis; "
          f"{args.seconds:.0f} s window (+{args.warmup:.0f} s warm-up); load average {load0:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    if allv:
        print(f"  speech end -> first agent audio, all turns: n={len(allv)}  p50 {pct(allv, 50):.0f}  "
              f"p95 {pct(allv, 95):.0f}  max {max(allv):.0f} ms")
    if said:
        print(f"    answered (synthesized reply): n={len(said)}  p50 {pct(said, 50):.0f}  "
              f"p95 {pct(said, 95):.0f} ms")
    if sorry:
        print(f"    \"sorry, I didn't catch that\" (no usable final in time): n={len(sorry)}  "
              f"p50 {pct(sorry, 50):.0f}  p95 {pct(sorry, 95):.0f} ms")
    other = len(allv) - len(said) - len(sorry)
    if other:
        print(f"    other prompts: n={other}")
    print(f"  turns without any answer in 8 s: {sum(c.no_reply for c in callers)}; calls handed off "
          f"(the recogniser heard a request for a person) or ended, then redialled: {redials[0]}")
    print(f"  worker stream lag ms: p50 {lag['p50'] * 1000:.1f}  p99 {lag['p99'] * 1000:.1f}  "
          f"max {lag['max'] * 1000:.1f}")
    window = args.seconds
    for name, (cpu, rss, _) in usage.items():
        c0 = marks["usage0"][name][0]
        share = 100 * (cpu - c0) / window
        print(f"  {name}: CPU {share:.0f}% of a core = {share / args.calls:.2f}% per call; RSS "
              f"{rss:.0f} MB ({idle[name][1]:.0f} MB before the calls: "
              f"{1024 * (rss - idle[name][1]) / args.calls:.0f} KiB per call)")
    if gw.late_ticks:
        print(f"  note: the fake gateway fell behind real time on {gw.late_ticks} ticks")
    return 0


def intents(args: argparse.Namespace) -> int:
    from piopiy_voice.contracts import AudioFrame
    from piopiy_voice.speech.asr import make_recognizer
    from piopiy_voice.speech.transcriber import CallTranscriber
    from piopiy_voice.workers.agent.intents import classify

    rules_ok = sum(classify(p).name == want for p, want in PHRASES)
    wrong_rules = [(p, classify(p).name, want) for p, want in PHRASES if classify(p).name != want]
    print(f"{len(PHRASES)} phrases x {len(VOICES)} voices; rules on the reference text: "
          f"{rules_ok}/{len(PHRASES)} intents right" + (f" (wrong: {wrong_rules})" if wrong_rules else ""))
    rec = make_recognizer("pocketsphinx", mode="domain")
    for rate in (8000, 16000):
        fb = rate // 50 * 2
        errs = words = ok = n = 0
        confusions: dict[tuple[str, str], int] = {}
        cpu = speech_s = 0.0
        for v, (voice, wpm, pitch) in enumerate(VOICES):
            synth = EspeakSynthesizer(voice, wpm, pitch)
            for i, (text, want) in enumerate(PHRASES):
                pcm = synth.synthesize_sync(text, rate)
                speech_s += len(pcm) / 2 / rate
                track = bytes(fb * 25) + pcm + bytes(-len(pcm) % fb) + bytes(fb * 50)
                core = CallTranscriber(f"i{v}-{i}", rate, rec)
                heard = []
                t = time.process_time()
                for k in range(0, len(track), fb):
                    frame = AudioFrame(call_id=core.call_id, seq=k // fb + 1, pcm=track[k:k + fb])
                    for tr in core.handle(f"{k}-0", frame):
                        if tr.final and tr.text:
                            heard.append(tr.text)
                cpu += time.process_time() - t
                hyp = " ".join(heard)
                e, w = wer_counts(text, hyp)
                errs, words = errs + e, words + w
                got = classify(hyp).name
                n += 1
                ok += got == want
                if got != want:
                    confusions[(want, got)] = confusions.get((want, got), 0) + 1
        top = sorted(confusions.items(), key=lambda kv: -kv[1])[:5]
        n_hand = sum(want == "handoff" for _, want in PHRASES) * len(VOICES)
        missed = sum(k for (want, got), k in confusions.items() if want == "handoff")
        false = sum(k for (want, got), k in confusions.items() if got == "handoff")
        print(f"  {rate} Hz: WER {errs / words:.1%}; intent accuracy on the recognizer's output "
              f"{ok}/{n} = {ok / n:.0%}; transcriber core CPU {cpu / speech_s:.3f} s per s of speech; "
              f"hand-off asked for and heard {n_hand - missed}/{n_hand}, hand-off where none was "
              f"asked {false}/{n - n_hand}; most frequent confusions (expected->got): "
              + (", ".join(f"{a}->{b} x{k}" for (a, b), k in top) or "none"))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    lat = sub.add_parser("latency", help="voice-to-voice latency of the whole pipeline")
    lat.add_argument("--calls", type=int, default=25)
    lat.add_argument("--seconds", type=float, default=40.0, help="measured window")
    lat.add_argument("--warmup", type=float, default=10.0)
    lat.add_argument("--agent", choices=tuple(AGENTS), default="default")
    lat.add_argument("--model-delay", type=float, default=0.3, help="fake model's first-token delay (s)")
    lat.add_argument("--transcribers", type=int, default=1)
    lat.add_argument("--rate", type=int, default=8000, choices=(8000, 16000))
    sub.add_parser("intents", help="intent accuracy on the recognizer's output")
    args = ap.parse_args(argv)
    return latency(args) if args.mode == "latency" else intents(args)


if __name__ == "__main__":
    sys.exit(main())
