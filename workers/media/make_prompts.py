"""Regenerate the default agent's prompt WAVs (8 kHz mono 16-bit).

Run once at build time: ``python -m piopiy_voice.workers.media.make_prompts [name...]``.
Uses the ``espeak-ng`` program (real speech, 22050 Hz output, converted here to
8 kHz) when it is installed, else libespeak-ng from the ``espeakng-loader``
wheel (``piopiy_voice.speech.tts``), else falls back to
``piopiy_voice.audio.synth.speech_like`` so the project still ships usable
prompts. The generated files are committed; the worker never runs this.
``sorry`` and ``trouble`` are the agents' fallbacks: shipped audio, because the
synthesizer may be what failed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from piopiy_voice.audio import read_wav, speech_like, write_wav

HERE = Path(__file__).resolve().parent
RATE = 8000
PROMPTS = {
    "greeting": "Hello, this is the automated assistant. How can I help you today? "
                "Press zero for a person.",
    "reply": "Thank you. I have noted that. Anything else?",
    "reprompt": "Are you still there?",
    "goodbye": "Thank you for calling. Goodbye.",
    "hold": "Please hold while I connect you to a person.",
    "sorry": "Sorry, I didn't catch that. Could you say it again?",
    "trouble": "Sorry, I'm having trouble answering right now. Could you say that again?",
}
MAX_BYTES = 100_000


def _to_8k(pcm: bytes, rate: int) -> bytes:
    """Any rate -> 8 kHz: windowed-sinc low-pass at 3.4 kHz, then interpolation."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if rate != RATE:
        cutoff = 3400.0 / rate
        taps = np.arange(-64, 65)
        h = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.blackman(taps.size)
        x = np.convolve(x, h / h.sum(), mode="same")
        t_out = np.arange(int(x.size * RATE / rate)) * rate / RATE
        x = np.interp(t_out, np.arange(x.size), x)
    peak = float(np.abs(x).max() or 1.0)
    x = x * (0.7 * 32767 / peak)  # normalise: telephone prompts at a steady level
    return np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes()


def make(name: str, text: str) -> Path:
    out = HERE / f"{name}.wav"
    exe = shutil.which("espeak-ng")
    if exe:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "x.wav"
            subprocess.run([exe, "-s", "165", "-w", str(raw), text], check=True)
            pcm, rate = read_wav(raw)
        pcm = _to_8k(pcm, rate)
    else:
        try:
            from piopiy_voice.speech.tts import EspeakSynthesizer
            pcm, rate = EspeakSynthesizer().synthesize_sync(text, 16000), 16000
            pcm = _to_8k(pcm, rate)
        except Exception:  # no engine at all: placeholder audio of about the right length
            pcm = speech_like(300 + 60 * len(text.split()), rate=RATE, seed=len(name))
    pcm = pcm[: MAX_BYTES - 100]
    write_wav(out, pcm, RATE)
    return out


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(PROMPTS)
    for name in names:
        text = PROMPTS[name]
        path = make(name, text)
        print(f"{path.name}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
