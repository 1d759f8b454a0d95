"""CPU cost per 20 ms frame of the worker's per-call audio analysis (VAD, DTMF) and of resampling.

Run: .venv/bin/python bench/audio_bench.py [--frames 20000]

Resampling is measured before/after side by side in one run: the numpy
polyphase FIR the project used before (bench/legacy_resample.py, kept only
for this comparison) against the soxr one now in piopiy_voice.audio.resample,
streaming one 20 ms frame at a time and one-shot on 1 s buffers.

Frames are a realistic mix (speech-like audio, silence, DTMF presses) and are
fed one at a time through ``process`` as a worker does for interleaved calls;
``detect_many`` shows the batched DTMF path. CPU time is ``time.process_time``
so other load on the machine does not inflate the figures. "Calls per core" is
how many concurrent calls (50 frames/s each) one core could analyse.
"""

from __future__ import annotations

import argparse
import time


import legacy_resample  # bench/ is the script's directory: on the path when run as a script

from piopiy_voice.audio import (
    DtmfDetector, EnergyVad, dtmf_sequence, frame_bytes, silence, speech_like,
)
from piopiy_voice.audio import resample as soxr_resample
from piopiy_voice.audio.resample import Resampler as SoxrResampler

FRAMES_PER_CALL_SECOND = 50


def make_frames(rate: int, count: int) -> list[bytes]:
    block = speech_like(4000, rate, seed=3) + silence(1000, rate) + dtmf_sequence("1234567890", 80, 80, rate)
    fb = frame_bytes(rate)
    frames = [block[i:i + fb] for i in range(0, len(block) - fb + 1, fb)]
    return (frames * (count // len(frames) + 1))[:count]


def cpu_per_frame(fn, frames) -> float:
    t0 = time.process_time()
    fn(frames)
    return (time.process_time() - t0) / len(frames)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    args = ap.parse_args()
    print(f"{'rate':>6} {'path':<22} {'us/frame':>9} {'calls/core':>10}")
    results: dict[int, float] = {}
    for rate in (8000, 16000):
        frames = make_frames(rate, args.frames)

        def vad(fr, v=EnergyVad(rate)):
            for f in fr:
                v.process(f)

        def dtmf(fr, d=DtmfDetector(rate)):
            for f in fr:
                d.process(f)

        def both(fr, v=EnergyVad(rate), d=DtmfDetector(rate)):
            for f in fr:
                v.process(f)
                d.process(f)

        def dtmf_batch(fr, d=DtmfDetector(rate)):
            for i in range(0, len(fr), 50):
                d.detect_many(fr[i:i + 50])

        for name, fn in (("vad", vad), ("dtmf", dtmf), ("vad+dtmf", both), ("dtmf detect_many(50)", dtmf_batch)):
            fn(frames[:200])  # warm-up
            per = cpu_per_frame(fn, frames)
            print(f"{rate:>6} {name:<22} {per * 1e6:9.2f} {1 / (per * FRAMES_PER_CALL_SECOND):10.0f}")
            if name == "vad+dtmf":
                results[rate] = per
    for rate, per in results.items():
        load = per * 200 * FRAMES_PER_CALL_SECOND
        print(f"200 calls at {rate} Hz, VAD+DTMF per frame: {load:.1%} of one core")
    resample_bench(args.frames)
    return 0


def resample_bench(n_frames: int) -> None:
    """Before (numpy FIR) / after (soxr), CPU us per 20 ms frame, side by side."""
    print(f"\nresampling, CPU us per 20 ms of audio: before (numpy FIR) | after (soxr) | ratio")
    print(f"{'pair':<12} {'mode':<10} {'before':>9} {'after':>9} {'ratio':>7}")
    for src, dst in ((8000, 16000), (16000, 8000), (32000, 16000), (8000, 32000)):
        frames = make_frames(src, n_frames)
        second = b"".join(frames[:50])

        def stream(fr, cls):
            r = cls(src, dst)
            for f in fr:
                r.process(f)

        def oneshot(fr, fn, n=max(1, n_frames // 50)):
            for _ in range(n):
                fn(second, src, dst)

        for mode, run_old, run_new, per in (
            ("stream", lambda fr: stream(fr, legacy_resample.Resampler),
             lambda fr: stream(fr, SoxrResampler), len(frames)),
            ("one-shot", lambda fr: oneshot(fr, legacy_resample.resample),
             lambda fr: oneshot(fr, soxr_resample), max(1, n_frames // 50) * 50),
        ):
            run_old(frames[:100])
            run_new(frames[:100])  # warm-up (filter design, caches)
            t0 = time.process_time()
            run_old(frames)
            old = (time.process_time() - t0) / per
            t0 = time.process_time()
            run_new(frames)
            new = (time.process_time() - t0) / per
            pair = f"{src // 1000}k->{dst // 1000}k"
            print(f"{pair:<12} {mode:<10} {old * 1e6:9.2f} {new * 1e6:9.2f} "
                  f"{old / new:6.1f}x")


if __name__ == "__main__":
    raise SystemExit(main())
