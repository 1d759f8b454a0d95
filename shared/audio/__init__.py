"""Audio helpers: 16-bit LE mono PCM at 8/16/32 kHz in 20 ms frames.

Framing and levels (``pcm``), sample-rate conversion (``resample``), WAV I/O
(``wav``), energy VAD (``vad``), DTMF generation and detection (``dtmf``) and
test-signal synthesis (``synth``).
"""

from .dtmf import KEYS as DTMF_KEYS, DtmfDetector, dtmf_sequence, dtmf_tone
from .pcm import (
    FRAME_MS,
    SAMPLE_WIDTH,
    SUPPORTED_RATES,
    Reframer,
    array_to_pcm,
    check_rate,
    duration_ms,
    frame_bytes,
    frame_samples,
    mix,
    pcm_to_array,
    rms_dbfs,
    silence,
)
from .resample import Resampler, resample
from .synth import speech_like, tone
from .vad import EnergyVad
from .wav import read_wav, wav_bytes, write_wav

__all__ = [
    "DTMF_KEYS", "DtmfDetector", "dtmf_sequence", "dtmf_tone",
    "FRAME_MS", "SAMPLE_WIDTH", "SUPPORTED_RATES", "Reframer", "array_to_pcm", "check_rate",
    "duration_ms", "frame_bytes", "frame_samples", "mix", "pcm_to_array", "rms_dbfs", "silence",
    "Resampler", "resample", "speech_like", "tone", "EnergyVad", "read_wav", "wav_bytes",
    "write_wav",
]
