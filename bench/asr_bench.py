"""Offline recognition: word error rate, CPU and memory per talking call.

Run: .venv/bin/python bench/asr_bench.py [--dictation]

Test phrases (below) are call-centre requests spoken by espeak-ng with 4
voices at 8 and 16 kHz. About half are lines of the default corpus, half are
new combinations of its words (the domain LM must generalise, not look up).
Reported per rate:

- WER of ``pocketsphinx`` (domain LM, the default) over all phrase x voice
  pairs (word-level Levenshtein / reference words); ``--dictation`` adds the
  shipped general LM for comparison;
- CPU (``time.process_time``) per second of talking audio, recognizer only,
  and for the whole per-call transcriber core (VAD + turns + recognizer) on a
  call track with pauses: "cores per talking call";
- RSS added per recognizer decoder (each concurrently decoded segment holds
  one; ``/proc/self/statm``), and the process RSS after loading.
"""

from __future__ import annotations

import argparse
import os
import time

from piopiy_voice.contracts import AudioFrame
from piopiy_voice.speech.asr import make_recognizer
from piopiy_voice.speech.transcriber import CallTranscriber
from piopiy_voice.speech.tts import EspeakSynthesizer

PHRASES = [
    # corpus lines
    "i want to speak to a real person",
    "what are your opening hours",
    "what is my account balance",
    "where is my order",
    "yes that is correct",
    "no thank you",
    "can you repeat that",
    "thank you goodbye",
    "i forgot my password",
    "are you open on sunday",
    # new combinations of corpus words
    "hello i want to check my order",
    "can i talk to an operator please",
    "what time do you open tomorrow",
    "i have a problem with my card",
    "no i want a human",
    "yes i would like to pay my bill",
    "my card was lost",
    "are you open this evening",
    "i need to speak to an agent about my order",
    "good morning i have a question about my balance",
]
VOICES = [("en-us", 160, 50), ("en", 175, 40), ("en-us+f3", 150, 60), ("en-gb-scotland", 170, 45)]


def wer_counts(ref: str, hyp: str) -> tuple[int, int]:
    r, h = ref.split(), hyp.split()
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        nd = [i] + [0] * len(h)
        for j in range(1, len(h) + 1):
            nd[j] = min(d[j] + 1, nd[j - 1] + 1, d[j - 1] + (r[i - 1] != h[j - 1]))
        d = nd
    return d[-1], len(r)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def decode(rec, pcm: bytes, rate: int) -> str:
    s = rec.open(rate)
    fb = rate // 50 * 2
    for i in range(0, len(pcm), fb):
        s.feed(pcm[i:i + fb])
    return s.finish().text


def run(mode: str) -> None:
    base = rss_mb()
    rec = make_recognizer("pocketsphinx", mode=mode)
    loaded = rss_mb()
    for rate in (8000, 16000):
        audio = [(p, EspeakSynthesizer(v, w, pi).synthesize_sync(p, rate), v) for p in PHRASES
                 for v, w, pi in VOICES]
        decode(rec, audio[0][1], rate)  # first open at this rate calibrates (not timed)
        errs = words = 0
        seconds = sum(len(a) for _, a, _ in audio) / 2 / rate
        t = time.process_time()
        exact = 0
        by_voice: dict[str, list[int]] = {}
        for ref, pcm, voice in audio:
            hyp = decode(rec, pcm, rate)
            e, n = wer_counts(ref, hyp)
            errs += e
            words += n
            exact += hyp == ref
            v = by_voice.setdefault(voice, [0, 0])
            v[0] += e
            v[1] += n
        cpu = time.process_time() - t
        # The whole core on a call track: 1 s pauses between phrases.
        fb = rate // 50 * 2
        track = bytes(fb * 25)
        for _, pcm, _ in audio[:20]:
            track += pcm + bytes(-len(pcm) % fb) + bytes(fb * 50)
        core = CallTranscriber("bench", rate, rec)
        t = time.process_time()
        finals = 0
        for i in range(0, len(track), fb):
            finals += sum(x.final for x in core.handle(f"{i}-0", AudioFrame(call_id="bench", seq=i // fb + 1,
                                                                            pcm=track[i:i + fb])))
        core_cpu = time.process_time() - t
        call_s = len(track) / 2 / rate
        print(f"{mode:<10}{rate:>6}  WER {errs / words:6.1%}  sentences exact {exact}/{len(audio)}  "
              f"recognizer CPU {cpu / seconds:.3f} s per s of speech  "
              f"core CPU {core_cpu / call_s:.3f} s per s of call ({finals} finals, {call_s:.0f} s)")
        print("          by voice: " + ", ".join(f"{v} {e / n:.0%}" for v, (e, n) in by_voice.items()))
    before = rss_mb()
    streams = [rec.open(16000) for _ in range(4)]
    per = (rss_mb() - before) / 4
    for s in streams:
        s.close()
    print(f"{mode:<10} RSS: process {base:.0f} MB before, {loaded:.0f} MB with the recognizer loaded; "
          f"+{per:.1f} MB per extra concurrent decoder")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dictation", action="store_true", help="also measure the shipped general LM")
    args = ap.parse_args()
    print(f"{len(PHRASES)} phrases x {len(VOICES)} voices")
    run("domain")
    if args.dictation:
        run("dictation")


if __name__ == "__main__":
    main()
