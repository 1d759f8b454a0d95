"""Voice-to-voice latency of the offline stack, and intent accuracy of the default agent.

    .venv/bin/python bench/voice_bench.py latency [--calls 25] [--seconds 40] [--warmup 10]
        [--agent default|llm] [--model-delay 0.3] [--transcribers 1] [--rate 8000] [--rev REV]
    .venv/bin/python bench/voice_bench.py intents
    .venv/bin/python bench/voice_bench.py transcriber [--calls 25] [--seconds 40] [--warmup 10]
        [--rate 8000] [--compare-rev REV]

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
nothing usable). Also the callers' talking time in the window, and CPU (% of
a core, and per talking call-second) and RSS of the worker and each
transcriber. ``--rev REV`` runs the worker and transcribers of git revision
REV (``bench/revtree.py``), so alternated runs compare two revisions.

``intents``: no Redis. Each phrase (with its expected intent) is spoken by 4
espeak voices at 8 and 16 kHz, run through the transcriber's per-call core
(``speech.transcriber.CallTranscriber``: VAD, segmenting, pocketsphinx with
the domain LM) and the finals classified by ``workers.agent.intents.classify``.
Reports word error rate, intent accuracy (on the reference text, i.e. the
rules alone, and on what the recognizer heard), and recognition CPU.

``transcriber``: the transcriber role alone (no worker, no agent). A private
redis-server and one real ``piopiy-voice transcriber`` process; N scripted
callers (``ScriptedCaller``: a question from the phrases below in one of the
4 espeak voices, then 2-4.5 s of silence standing in for the agent's answer,
again; ~1/3 of the time talking) fed in real time, one frame per call per
20 ms. Reports the transcriber's CPU per talking call-second (and % of a core
per call), RSS per call, and final latency: the entry time of a question's
last speech frame -> the entry time of its final ``Transcript`` in the call's
stream (p50/p95), plus the WER of those finals (the live path's accuracy).
``--compare-rev REV`` also runs the transcriber of git revision REV
(``bench/revtree.py``), alternating runs with the working tree's (REV, tree,
REV, tree: ``--rounds``), each on a fresh private redis-server and the same
seeded feed. Alternated, not simultaneous: two transcribers plus the feeder
on 2 cores starve each other, and a starved transcriber's CPU share is
capped by the machine, not by its code.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

from asr_bench import wer_counts  # one word-error counter for the benches
from callsim import FRAME_S, ROOT, Caller, Gateway, System, cpu_s, pct, rss_mb, speech_frames

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.audio import frame_bytes
from piopiy_voice.redisconn import EmbeddedRedis, connect
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
        self.talking_since: float | None = None   # wall time from which talking frames count
        self.talking_frames = 0

    def next_frame(self, now: float) -> tuple[bytes, str | None]:
        frame, mark = super().next_frame(now)
        if self.talking_since is not None and now >= self.talking_since and frame != self.silence:
            self.talking_frames += 1
        return frame, mark

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
    env = {"PV_TTS": "espeak"}
    if args.rev:
        from revtree import package_root
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root(args.rev)),
                                                          os.environ.get("PYTHONPATH")]))
    system = System(AGENTS[args.agent], env, transcribers=args.transcribers,
                    llm_delay_s=args.model_delay if args.agent == "llm" else None, llm_text=LLM_REPLY)
    callers = [AskingCaller(f"v2v-{os.getpid()}-{i}", args.rate, speech, random.Random(i))
               for i in range(args.calls)]
    redials = [0]

    def redial(old: AskingCaller) -> AskingCaller:
        redials[0] += 1
        new = AskingCaller(f"{old.call_id}-r{redials[0]}", args.rate, speech, old.rng)
        new.talking_since = old.talking_since
        return new

    gw = Gateway(system, callers, redial=redial)
    try:
        idle = system.usage()
        gw.start_calls()
        for cl in callers:
            cl.talking_since = time.time() + args.warmup   # the measured window's start
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
    talk_s = sum(cl.talking_frames for cl in callers) * FRAME_S
    print(f"voice-to-voice bench: {args.calls} calls @ {args.rate} Hz, agent {args.agent}"
          + (f", worker and transcriber of revision {args.rev}" if args.rev else "")
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
    print(f"  turns without any answer in 8 s: {sum(cl.no_reply for cl in callers)}; calls handed off "
          f"(the recogniser heard a request for a person) or ended, then redialled: {redials[0]}")
    print(f"  worker stream lag ms: p50 {lag['p50'] * 1000:.1f}  p99 {lag['p99'] * 1000:.1f}  "
          f"max {lag['max'] * 1000:.1f}")
    window = args.seconds
    print(f"  callers talking {talk_s:.0f} call-s in the window ({talk_s / window / args.calls:.0%} of call time)")
    for name, (cpu, rss, *_) in usage.items():
        c0 = marks["usage0"][name][0]
        share = 100 * (cpu - c0) / window
        print(f"  {name}: CPU {share:.0f}% of a core = {share / args.calls:.2f}% per call, "
              f"{1000 * (cpu - c0) / max(talk_s, 1e-9):.1f} ms per talking call-second; RSS "
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


class ScriptedCaller:
    """A caller of the ``transcriber`` mode: asks, is silent while the (absent)
    agent would answer, asks again; the same script for every transcriber fed."""

    def __init__(self, call_id: str, rate: int, speech: dict, rng: random.Random) -> None:
        self.call_id, self.rng, self.speech = call_id, rng, speech
        self.silence = bytes(frame_bytes(rate))
        self.frames: list[tuple[bytes, str | None]] = [(self.silence, None)] * rng.randrange(25, 150)

    def next_frame(self) -> tuple[bytes, str | None]:
        if not self.frames:
            text = self.rng.choice(ASKING)
            frames, first, last = self.speech[(text, self.rng.randrange(len(VOICES)))]
            self.frames = [(f, "onset" if i == first else f"end:{text}" if i == last else None)
                           for i, f in enumerate(frames)]
            self.frames += [(self.silence, None)] * int(self.rng.uniform(2.0, 4.5) / FRAME_S)
        return self.frames.pop(0)


class TranscriberUnderTest:
    """One transcriber process (the working tree's, or ``code``'s) on its own redis-server."""

    def __init__(self, label: str, code=None) -> None:
        self.label = label
        self.redis = EmbeddedRedis()
        self.r = connect(self.redis.url)
        self.pipe = self.r.pipeline(transaction=False)
        path = os.pathsep.join(filter(None, [str(code) if code else None, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, REDIS_URL=self.redis.url, PV_LOG_LEVEL="WARNING", PYTHONPATH=path)
        self.proc = subprocess.Popen([sys.executable, "-m", "piopiy_voice.speech.transcriber_role",
                                      "--id", f"bench-{label.split()[0]}", "--redis-url", self.redis.url],
                                     env=env, cwd=ROOT)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.redis.close()

    def finals(self, call_id: str) -> list[tuple[int, str]]:
        """(entry ms, text) of the final transcripts in a call's stream."""
        out, start = [], "-"
        stream = keys.call_stream(call_id)
        for _ in range(100):
            batch = self.r.xrange(stream, start, "+", count=5000)
            for eid, f in batch:
                if f.get(b"type") == b"transcript":
                    t = c.decode(f)
                    if t.final:
                        out.append((keys.entry_ms(eid), t.text))
            if len(batch) < 5000:
                break
            start = "(" + batch[-1][0].decode()
        return out


def _final_latencies(asked: list[tuple[str, int, int]], finals: list[tuple[int, str]],
                     since: int) -> tuple[list[int], int, int, int]:
    """Per question ended in the window: speech end -> the first final after it
    (before the next question's onset); and (errors, words, questions without a
    final) over the finals heard from each question's onset to the next one's."""
    lat, errs, words, missing = [], 0, 0, 0
    for i, (text, onset, end) in enumerate(asked):
        nxt = asked[i + 1][1] if i + 1 < len(asked) else None
        if end < since or nxt is None:
            continue   # before the window, or cut off by the run's end
        heard = [(t, x) for t, x in finals if onset <= t < nxt]
        after = [t for t, _ in heard if t >= end]
        if after:
            lat.append(after[0] - end)
        else:
            missing += 1
        e, w = wer_counts(text, " ".join(x for _, x in heard))
        errs, words = errs + e, words + w
    return lat, errs, words, missing


def _run_transcriber(args: argparse.Namespace, speech: dict, t: TranscriberUnderTest) -> dict:
    """One measured run of ``t`` on the scripted feed (the same for every run: seeded)."""
    time.sleep(3.0)   # model loaded
    idle = rss_mb(t.proc.pid)
    load0 = os.getloadavg()[0]
    callers = [ScriptedCaller(f"asr-{os.getpid()}-{i}", args.rate, speech, random.Random(i))
               for i in range(args.calls)]
    for cl in callers:
        f = c.encode(c.CallStarted(call_id=cl.call_id, seq=1, gateway_id="bench-gw", rate=args.rate))
        t.pipe.xadd(keys.call_stream(cl.call_id), f)
        t.pipe.xadd(keys.CALLS_STREAM, f)
    t.pipe.execute()
    asked: dict[str, list[tuple[str, int, int]]] = {cl.call_id: [] for cl in callers}
    onset: dict[str, int] = {}
    t0 = time.monotonic()
    tick, since, cpu0, talking, late = 0, 0, 0.0, 0, 0
    ticks = int((args.warmup + args.seconds) / FRAME_S)
    while tick < ticks:
        due = min(ticks, int((time.monotonic() - t0) / FRAME_S) + 1)
        late += due - tick > 2
        while tick < due:
            if not since and tick * FRAME_S >= args.warmup:
                since, cpu0 = int(time.time() * 1000), cpu_s(t.proc.pid)
            frames = [cl.next_frame() for cl in callers]
            for cl, (pcm, _) in zip(callers, frames):
                t.pipe.xadd(keys.call_stream(cl.call_id), c.audio_fields(cl.call_id, tick + 2, pcm),
                            maxlen=keys.CALL_STREAM_MAXLEN, approximate=True)
            for cl, (pcm, mark), eid in zip(callers, frames, t.pipe.execute()):
                if mark == "onset":
                    onset[cl.call_id] = keys.entry_ms(eid)
                elif mark is not None and cl.call_id in onset:
                    asked[cl.call_id].append((mark[4:], onset[cl.call_id], keys.entry_ms(eid)))
                talking += bool(since) and pcm != cl.silence
            tick += 1
        time.sleep(max(0.0, t0 + tick * FRAME_S - time.monotonic()))
    window = time.monotonic() - t0 - args.warmup
    cpu, rss = cpu_s(t.proc.pid) - cpu0, rss_mb(t.proc.pid)
    time.sleep(2.0)   # the last finals
    lat, errs, words, missing = [], 0, 0, 0
    for cl in callers:
        part = _final_latencies(asked[cl.call_id], t.finals(cl.call_id), since)
        lat += part[0]
        errs, words, missing = errs + part[1], words + part[2], missing + part[3]
    end = [cl.call_id for cl in callers]
    for cid in end:   # end the calls: the next run starts from an idle transcriber
        t.pipe.xadd(keys.call_stream(cid), c.encode(c.CallEnded(call_id=cid, seq=ticks + 2, reason="hangup")))
    t.pipe.execute()
    time.sleep(1.0)
    return dict(window=window, cpu=cpu, rss=rss, idle=idle, talk_s=talking * FRAME_S, lat=lat,
                wer=errs / max(1, words), missing=missing, late=late, load=(load0, os.getloadavg()[0]))


def transcriber(args: argparse.Namespace) -> int:
    synth = {v: EspeakSynthesizer(*VOICES[v]) for v in range(len(VOICES))}
    speech = {(t, v): speech_frames(synth[v].synthesize_sync(t, args.rate), args.rate)
              for t in ASKING for v in range(len(VOICES))}
    print(f"transcriber bench: {args.calls} calls @ {args.rate} Hz, {args.seconds:.0f} s window "
          f"(+{args.warmup:.0f} s warm-up) per run", flush=True)
    plan = [("working tree", None)]
    if args.compare_rev:
        from revtree import package_root
        code = package_root(args.compare_rev)
        plan = [(f"revision {args.compare_rev}", code), ("working tree", None)] * args.rounds
    cpu_per_talk: dict[str, list[float]] = {}
    for label, code in plan:
        t = TranscriberUnderTest(label, code)
        try:
            m = _run_transcriber(args, speech, t)
        finally:
            t.close()
        share = 100 * m["cpu"] / m["window"]
        cpu_per_talk.setdefault(label, []).append(1000 * m["cpu"] / m["talk_s"])
        lat = m["lat"]
        print(f"  {label} (pid {t.proc.pid}; load {m['load'][0]:.2f} -> {m['load'][1]:.2f}): CPU {share:.1f}% "
              f"of a core = {share / args.calls:.2f}% per call, {cpu_per_talk[label][-1]:.1f} ms per talking "
              f"call-second ({m['talk_s'] / m['window'] / args.calls:.0%} of call time talking); RSS "
              f"{m['rss']:.0f} MB (+{1024 * (m['rss'] - m['idle']) / args.calls:.0f} KiB per call); "
              f"speech end -> final: n={len(lat)} p50 {pct(lat, 50):.0f} p95 {pct(lat, 95):.0f} max "
              f"{max(lat, default=float('nan')):.0f} ms; no final {m['missing']}; WER of the finals "
              f"{m['wer']:.1%}" + (f"; feeder late on {m['late']} ticks" if m["late"] else ""), flush=True)
    if args.compare_rev:
        old, new = (statistics.median(v) for v in cpu_per_talk.values())
        print(f"  CPU per talking call-second, median of {args.rounds} alternated run(s): revision "
              f"{args.compare_rev} {old:.1f} ms, working tree {new:.1f} ms (x{new / old:.2f})")
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
    lat.add_argument("--rev", metavar="REV", help="run the worker and transcribers of git revision REV "
                     "(bench/revtree.py); the callers and fake gateway stay this tree's")
    sub.add_parser("intents", help="intent accuracy on the recognizer's output")
    tr = sub.add_parser("transcriber", help="the transcriber role alone: CPU, RSS, final latency")
    tr.add_argument("--calls", type=int, default=25)
    tr.add_argument("--seconds", type=float, default=40.0, help="measured window")
    tr.add_argument("--warmup", type=float, default=10.0)
    tr.add_argument("--rate", type=int, default=8000, choices=(8000, 16000))
    tr.add_argument("--compare-rev", metavar="REV", help="also run the transcriber of git revision REV, "
                    "alternating with the working tree's on the same scripted feed")
    tr.add_argument("--rounds", type=int, default=2, help="with --compare-rev: runs of each")
    args = ap.parse_args(argv)
    return {"latency": latency, "intents": intents, "transcriber": transcriber}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
