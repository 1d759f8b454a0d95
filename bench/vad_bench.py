"""Voice activity detectors on speech, silence, noise, music and babble.

Run: .venv/bin/python bench/vad_bench.py [--seconds 20] [--engines energy-level,energy,webrtc,silero]
     .venv/bin/python bench/vad_bench.py --batch 100    # the worker's batched scoring

Every signal is generated here, deterministically (fixed seeds):

- speech: espeak-ng (``speech.tts``) speaking 24 different sentences with 8
  voices/speeds/pitches, 0.3-0.9 s of pauses between them, over a faint hiss
  (-60 dBFS). A frame is *speech* when the clean speech in it is within 35 dB
  of the utterance's loudest frame (the reference), so pauses and word gaps
  count as non-speech and recall is measured on real voiced/unvoiced sound.
- silence: -70 dBFS dither; noise: white, pink and brown at -30 dBFS;
- music: chords (3-4 notes, 5 harmonics each, decaying envelopes) and
  melodies over a bass line at -26 dBFS, changing every 250-1000 ms;
- babble: 6 overlapping synthesised talkers, each a different voice, summed
  and set 8 dB below the speech level (a TV or a room behind the caller).

Per engine and rate: recall (speech frames with prob >= 0.5), false-alarm
rate on each non-speech signal (frames with prob >= 0.5), and CPU per 20 ms
frame (``time.process_time``). ``energy-level`` is the energy VAD's level
test alone (what the worker used before), ``energy`` the default engine.
Each engine instance is fresh per signal (one per call), as in production.

Then the same probabilities through the turn detector (``speech.turns``,
onset 80 ms) with and without its lead-in (``lead_in_ms``: loud unvoiced
frames just before a voiced run count toward the onset), per engine: the
onset delay on each utterance that starts a turn (first speech frame ->
the frame that fires ``speech_start``: the floor of barge-in latency) and
the false turn starts per minute on each non-speech signal (what would
barge in on the agent).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from piopiy_voice.audio.pcm import frame_bytes
from piopiy_voice.audio.vad import EnergyVad
from piopiy_voice.speech.tts import EspeakSynthesizer
from piopiy_voice.speech.turns import TurnDetector
from piopiy_voice.speech.vad import level_only_prob, make_vad

SENTENCES = [
    "Hello, I would like to check the balance on my account.",
    "What time do you open on Saturday morning?",
    "My order has not arrived yet and it has been two weeks.",
    "Can I speak to a real person please?",
    "I need to change the address on my delivery.",
    "Yes, that is correct, thank you very much.",
    "No, I did not make that payment last Tuesday.",
    "Could you tell me how much I owe this month?",
    "The internet in my house keeps dropping every evening.",
    "I am calling about the letter you sent me yesterday.",
    "Please cancel my subscription from next month.",
    "Is there somebody who can help me with a refund?",
    "I forgot my password and cannot log in anymore.",
    "The card was declined at the shop this afternoon.",
    "Can you send me a copy of the last invoice by email?",
    "My name is Sarah Johnson and my number ends in four seven.",
    "Okay, I will wait, but please be quick.",
    "Where is the nearest branch to the city centre?",
    "I would like to book an appointment for Thursday.",
    "That is not what I asked, let me explain again.",
    "How long will the repair take?",
    "Thank you, goodbye.",
    "I have been on hold for twenty minutes already.",
    "Do you have this model in blue?",
]
VOICES = [("en-us", 160, 50), ("en", 175, 40), ("en-us+f3", 150, 60), ("en-gb-scotland", 170, 45),
          ("en+m3", 185, 35), ("en-us+f2", 140, 70), ("en-029", 165, 55), ("en-gb-x-rp", 155, 50)]


def _db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(x ** 2) + 1e-12)


def _scale_to(x: np.ndarray, dbfs: float) -> np.ndarray:
    return x * 10 ** ((dbfs - _db(x)) / 20) if x.size else x


def speech_track(rate: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(signal in float full-scale units, per-frame speech labels, the frame
    index of each utterance's first speech frame)."""
    rng = np.random.default_rng(1)
    n = frame_bytes(rate) // 2
    parts, labels, firsts, at = [], [], [], 0
    for i, text in enumerate(SENTENCES):
        voice, wpm, pitch = VOICES[i % len(VOICES)]
        pcm = EspeakSynthesizer(voice, wpm, pitch).synthesize_sync(text, rate)
        x = np.frombuffer(pcm, "<i2").astype(np.float64) / 32768
        x = _scale_to(x, -22 + rng.uniform(-6, 6))
        gap = np.zeros(int(rate * rng.uniform(0.3, 0.9)))
        x = np.concatenate((gap, x))
        x = x[: x.size // n * n]
        fr = x.reshape(-1, n)
        lv = 10 * np.log10((fr ** 2).mean(axis=1) + 1e-12)
        labels.append(lv >= lv.max() - 35)
        firsts.append(at + int(np.argmax(labels[-1])))
        at += fr.shape[0]
        parts.append(x)
    sig = np.concatenate(parts)
    sig = sig + rng.standard_normal(sig.size) * 10 ** (-60 / 20)
    return sig, np.concatenate(labels), firsts


def colored_noise(rate: int, seconds: float, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = int(rate * seconds)
    w = rng.standard_normal(m)
    if kind == "white":
        return w
    spec = np.fft.rfft(w)
    f = np.fft.rfftfreq(m, 1 / rate)
    f[0] = f[1]
    spec = spec / (np.sqrt(f) if kind == "pink" else f)
    return np.fft.irfft(spec, m)


def music(rate: int, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    total = int(rate * seconds)
    out = np.zeros(total)
    t0 = 0
    scale = [0, 2, 4, 5, 7, 9, 11]
    while t0 < total:
        dur = int(rate * rng.choice([0.25, 0.5, 0.75, 1.0]))
        t = np.arange(dur) / rate
        env = np.exp(-t * rng.uniform(1.5, 5)) * np.minimum(1, t / 0.01)
        root = 48 + int(rng.integers(0, 12))
        if rng.random() < 0.5:  # a chord
            notes = [root, root + 4, root + 7] + ([root + 12] if rng.random() < 0.5 else [])
        else:                   # a melody note over a bass note
            notes = [root - 12, root + 12 + scale[int(rng.integers(0, 7))]]
        seg = np.zeros(dur)
        for note in notes:
            f0 = 440 * 2 ** ((note - 69) / 12)
            for h in range(1, 6):
                if f0 * h < rate / 2:
                    seg += np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.28)) / h
        end = min(total, t0 + dur)
        out[t0:end] += (seg * env)[: end - t0]
        t0 = end
    return out


def babble(rate: int, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    total = int(rate * seconds)
    out = np.zeros(total)
    for talker in range(6):
        voice, wpm, pitch = VOICES[talker % len(VOICES)]
        synth = EspeakSynthesizer(voice, wpm, pitch)
        pos = int(rng.uniform(0, 0.5) * rate)
        k = talker * 3
        while pos < total:
            pcm = synth.synthesize_sync(SENTENCES[k % len(SENTENCES)], rate)
            k += 1
            x = _scale_to(np.frombuffer(pcm, "<i2").astype(np.float64), -22)
            end = min(total, pos + x.size)
            out[pos:end] += x[: end - pos]
            pos = end + int(rng.uniform(0.05, 0.3) * rate)
    return out / 32768


def _frames(sig: np.ndarray, rate: int) -> list[bytes]:
    n = frame_bytes(rate) // 2
    x = np.clip(np.rint(sig * 32767), -32768, 32767).astype("<i2")
    x = x[: x.size // n * n]
    return [b.tobytes() for b in x.reshape(-1, n)]


def _run(engine: str, rate: int, frames: list[bytes]) -> tuple[np.ndarray, float]:
    if engine == "energy-level":
        ev = EnergyVad(rate, start_ms=0, hangover_ms=0)
        score = lambda f: level_only_prob(ev, f)  # noqa: E731
    else:
        score = make_vad(engine, rate).speech_prob
    t = time.process_time()
    probs = np.array([score(f) for f in frames])
    return probs, (time.process_time() - t) / max(1, len(frames))


def turn_starts(probs: np.ndarray, lead_in_ms: int) -> list[int]:
    """The frame indices that fired ``speech_start``, from per-frame probabilities."""
    td = TurnDetector(onset_ms=80, hangover_ms=400, lead_in_ms=lead_in_ms)
    out = []
    for i, p in enumerate(probs):
        if td.feed(float(p), i * 20) and td.speaking:
            out.append(i)
    return out


def onset_delays(probs: np.ndarray, firsts: list[int], lead_in_ms: int) -> list[int]:
    """ms from each utterance's first speech frame to the frame firing its
    ``speech_start`` (utterances that continue a turn still on are skipped)."""
    starts = turn_starts(probs, lead_in_ms)
    delays = []
    for k, f in enumerate(firsts):
        nxt = firsts[k + 1] if k + 1 < len(firsts) else len(probs)
        # the start that belongs to this utterance: the first within it (a start a
        # few frames early means the lead-in reached back into the gap's hiss: 0)
        hit = [j for j in starts if f - 4 <= j < nxt]
        if hit:
            delays.append(max(0, hit[0] - f) * 20)
    return delays


def batch_cost(rate: int, signals: list[list[bytes]], calls: int, turns: int = 300) -> None:
    """The energy engine the worker's way (``--batch N``): N calls, one frame
    each per loop turn, scored one by one vs ahead in one ``VoicingBatch`` per
    turn; the two alternate three times, CPU per frame of each, and whether
    every probability agreed."""
    from piopiy_voice.speech.vad import VoicingBatch

    streams = [signals[i % len(signals)][(37 * i) % 200:] for i in range(calls)]
    turns = min(turns, min(len(s) for s in streams))
    cost = {"one by one": [], "batched": []}
    differ = 0
    for _ in range(3):
        ref = [make_vad("energy", rate) for _ in streams]
        t = time.process_time()
        want = [[v.speech_prob(s[k]) for v, s in zip(ref, streams)] for k in range(turns)]
        cost["one by one"].append((time.process_time() - t) / (turns * calls))
        vads, batch = [make_vad("energy", rate) for _ in streams], VoicingBatch()
        t = time.process_time()
        got = []
        for k in range(turns):
            for v, s in zip(vads, streams):
                v.ahead(s[k], batch)
            batch.run()
            got.append([v.speech_prob(s[k]) for v, s in zip(vads, streams)])
        cost["batched"].append((time.process_time() - t) / (turns * calls))
        differ += sum(a != b for x, y in zip(want, got) for a, b in zip(x, y))
    print(f"energy engine, {calls} calls x {turns} turns at {rate} Hz (speech and the non-speech "
          f"signals, one frame per call per turn), three alternating runs:")
    for label, v in cost.items():
        print(f"  {label:<11} " + "  ".join(f"{c * 1e6:.1f}" for c in v) + " us CPU per frame")
    print(f"  batched / one by one: {np.mean(cost['batched']) / np.mean(cost['one by one']):.2f}x; "
          f"probabilities that differ: {differ} of {3 * turns * calls}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each non-speech signal")
    ap.add_argument("--engines", default="energy-level,energy,webrtc,silero")
    ap.add_argument("--rates", default="8000,16000")
    ap.add_argument("--batch", type=int, metavar="N",
                    help="instead: CPU per frame of the energy engine batched over N calls (the worker's way)")
    args = ap.parse_args()
    if args.batch:
        for rate in map(int, args.rates.split(",")):
            sp, _, _ = speech_track(rate)
            batch_cost(rate, [_frames(sp, rate), _frames(_scale_to(music(rate, 20, 5), -26), rate),
                              _frames(_scale_to(babble(rate, 20, 6), -30), rate),
                              _frames(_scale_to(colored_noise(rate, 20, "pink", 3), -30), rate)],
                       args.batch)
        return
    engines = args.engines.split(",")
    print(f"{'engine':<13}{'rate':>6}{'recall':>8}{'silence':>9}{'white':>7}{'pink':>7}{'brown':>7}"
          f"{'music':>7}{'babble':>8}{'us/frame':>10}")
    turn_rows = []
    for rate in map(int, args.rates.split(",")):
        sp, labels, firsts = speech_track(rate)
        secs = args.seconds
        rng = np.random.default_rng(9)
        others = {
            "silence": rng.standard_normal(int(rate * secs)) * 10 ** (-70 / 20),
            "white": _scale_to(colored_noise(rate, secs, "white", 2), -30),
            "pink": _scale_to(colored_noise(rate, secs, "pink", 3), -30),
            "brown": _scale_to(colored_noise(rate, secs, "brown", 4), -30),
            "music": _scale_to(music(rate, secs, 5), -26),
            "babble": _scale_to(babble(rate, secs, 6), -30),
        }
        sp_frames = _frames(sp, rate)
        other_frames = {k: _frames(v, rate) for k, v in others.items()}
        for engine in engines:
            probs, cpu = _run(engine, rate, sp_frames)
            lab = labels[: probs.size]
            recall = float((probs[lab] >= 0.5).mean())
            cpus = [cpu]
            fa = {}
            for k, fr in other_frames.items():
                p, c = _run(engine, rate, fr)
                fa[k] = float((p >= 0.5).mean())
                cpus.append(c)
            print(f"{engine:<13}{rate:>6}{recall:>8.1%}{fa['silence']:>9.1%}{fa['white']:>7.1%}"
                  f"{fa['pink']:>7.1%}{fa['brown']:>7.1%}{fa['music']:>7.1%}{fa['babble']:>8.1%}"
                  f"{np.mean(cpus) * 1e6:>10.0f}")
            if engine == "energy-level":
                continue
            other_probs = {k: _run(engine, rate, fr)[0] for k, fr in other_frames.items()}
            for lead in (0, 40, 60):
                d = onset_delays(probs, firsts, lead)
                false = {k: len(turn_starts(p, lead)) * 60 / (len(p) * 0.02) for k, p in other_probs.items()}
                turn_rows.append((engine, rate, lead, d, false))
    print("\nturn detector, onset 80 ms: onset delay on utterances that start a turn (ms), "
          "false turn starts per minute")
    print(f"{'engine':<9}{'rate':>6}{'lead-in':>8}{'n':>4}{'p50':>6}{'p90':>6}{'max':>6}"
          f"{'white':>7}{'pink':>7}{'brown':>7}{'music':>7}{'babble':>8}")
    for engine, rate, lead, d, false in turn_rows:
        print(f"{engine:<9}{rate:>6}{lead:>8}{len(d):>4}{np.percentile(d, 50):>6.0f}{np.percentile(d, 90):>6.0f}"
              f"{max(d):>6.0f}{false['white']:>7.1f}{false['pink']:>7.1f}{false['brown']:>7.1f}"
              f"{false['music']:>7.1f}{false['babble']:>8.1f}")


if __name__ == "__main__":
    main()
