"""Offline recognition with PocketSphinx and a domain language model built at start.

Theory of operation
-------------------
The en-us acoustic model in the ``pocketsphinx`` wheel is 16 kHz only (its
filter bank tops out above 4 kHz, so an 8 kHz decoder refuses to start): every
stream converts its input to 16 kHz with a streaming
``piopiy_voice.audio.resample.Resampler`` (8 kHz up, 32 kHz down).
Upsampled telephone audio has nothing above 4 kHz, where the model expects
fricatives and a noise floor: the log filter-bank energies of the empty band
collapse and throw the decoder off (measured WER on synthesized lines of the
corpus: 51% at 8 kHz vs 4% at 16 kHz). So 8 kHz streams get the empty
4.2-7.8 kHz band filled with noise at 0.3 x the recent speech level
(``_HighBandFill``), which brought 8 kHz to within a few points of 16 kHz on
the same lines. On ``bench/asr_bench.py``'s phrases, half of them new
combinations of the corpus's words spoken by 4 espeak voices, the WER is
much higher: ~40% at 8 kHz and ~45% at 16 kHz (2026-11-26; BENCHMARKS.md),
which is why the agent classifies intents from key words, not sentences.

What it is good for, and what not: open dictation with the shipped general
English LM (``mode="dictation"``) is poor on telephone and synthetic speech
(measured: "hello I would like to speak to a real person about my account
please" came back as garbage). So the default (``mode="domain"``) builds a
small trigram language model from a phrase list (the call-centre corpus
``asr_corpus.txt`` shipped here, or ``corpus=`` / ``PV_ASR_CORPUS``) and a
dictionary restricted to its words. It then recognises those phrases and
recombinations of their words well ("I want to speak to an agent", "what time
do you close", yes/no, numbers, goodbye) and cannot output a word outside the
corpus: anything else comes back as the nearest in-domain words. Use a network
engine for open speech.

The language model is written in ARPA format by ``build_arpa`` (our code):
trigrams with absolute discounting (D = 0.5) and Katz-style back-off weights,
unigrams interpolated with a uniform floor so every word stays reachable.

Decoders are expensive to create (model load) and hold per-utterance state;
the recognizer keeps a pool: ``open`` takes an idle decoder (or makes one),
``finish``/``close`` returns it. The pool grows to the number of segments
decoded at once by this process (one pool per input rate, sharing the
learnt cepstral mean). The live cepstral mean normalisation needs about one
utterance to settle, and 8 kHz audio is far from the model's default, so
the first ``open`` at a rate primes it on a built-in synthesized sentence
(``calibrate=False`` to skip), and every recognised segment updates it. Partial hypotheses are produced at most once
per ``partial_every_ms`` of audio (default 300 ms), only when the text changed.

Search: the first pass (lexicon-tree Viterbi, ``fwdtree``) runs as audio
arrives; pocketsphinx's default second pass (``fwdflat``: a flat-lexicon
re-decode of the whole utterance) runs inside ``end_utt``, i.e. after the
caller stopped, on the path to the final. It is off by default
(``second_pass=True`` turns it on): it was ~40% of the decoder's CPU per
second of speech and most of ``finish()``'s time (p50 57 ms -> 8 ms per
utterance at 8 kHz, max 137 -> 18 ms; more under load), time a caller waits
for the answer, and with the domain LM's weight retuned for one pass (9, not
10) accuracy stayed where it was (asr_bench's 80 utterances: 8 kHz 40.0% ->
40.3%, 16 kHz 45.1% -> 44.2%; intents: BENCHMARKS.md). The lattice pass
(``bestpath``: the final hypothesis and its posterior, the confidence) stays.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from piopiy_voice.audio.resample import Resampler

from .asr import Hyp
from .errors import EngineUnavailable, RecognitionError, SpeechError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).with_name("asr_corpus.txt")
MODEL_RATE = 16000
_WORD = re.compile(r"[a-z']+")
_DISCOUNT = 0.5
_CALIBRATION = "Hello, thank you for calling. How can I help you today?"
_UNIFORM = 0.1  # share of unigram mass spread evenly over the vocabulary


def read_corpus(path: str | os.PathLike | None = None) -> list[str]:
    """Phrases of a corpus file (one a line, '#' comments); the default corpus when None."""
    p = Path(path) if path else DEFAULT_CORPUS
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpeechError(f"cannot read the recognizer corpus {p}: {exc}") from None
    phrases = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    phrases = [ph for ph in phrases if ph]
    if not phrases:
        raise SpeechError(f"the recognizer corpus {p} has no phrases")
    return phrases


def tokenize(phrase: str) -> list[str]:
    return _WORD.findall(phrase.lower())


def build_arpa(sentences: Iterable[list[str]]) -> str:
    """A trigram ARPA language model of tokenised ``sentences`` (see the module docstring)."""
    c1: Counter = Counter()
    c2: Counter = Counter()
    c3: Counter = Counter()
    for words in sentences:
        if not words:
            continue
        s = ["<s>", *words, "</s>"]
        c1.update(s)
        c2.update(zip(s, s[1:]))
        c3.update(zip(s, s[1:], s[2:]))
    if not c1:
        raise SpeechError("the recognizer corpus has no words")
    vocab = sorted(w for w in c1 if w != "<s>")
    total = sum(n for w, n in c1.items() if w != "<s>")
    p1 = {w: (1 - _UNIFORM) * c1[w] / total + _UNIFORM / len(vocab) for w in vocab}

    # Bigram: discounted probabilities and back-off weights of each history.
    h1: dict[str, int] = defaultdict(int)
    for (a, _b), n in c2.items():
        h1[a] += n
    p2 = {(a, b): (n - _DISCOUNT) / h1[a] for (a, b), n in c2.items()}
    seen2: dict[str, list[str]] = defaultdict(list)
    for a, b in c2:
        seen2[a].append(b)
    bo1 = {}
    for a, nexts in seen2.items():
        left = 1 - sum(p2[(a, b)] for b in nexts)
        denom = 1 - sum(p1[b] for b in nexts)
        bo1[a] = left / denom if denom > 1e-12 else 1.0

    def pbo2(a: str, b: str) -> float:
        return p2[(a, b)] if (a, b) in p2 else bo1.get(a, 1.0) * p1[b]

    h2: dict[tuple[str, str], int] = defaultdict(int)
    for (a, b, _c), n in c3.items():
        h2[(a, b)] += n
    p3 = {k: (n - _DISCOUNT) / h2[k[:2]] for k, n in c3.items()}
    seen3: dict[tuple[str, str], list[str]] = defaultdict(list)
    for a, b, c in c3:
        seen3[(a, b)].append(c)
    bo2 = {}
    for (a, b), nexts in seen3.items():
        left = 1 - sum(p3[(a, b, c)] for c in nexts)
        denom = 1 - sum(pbo2(b, c) for c in nexts)
        bo2[(a, b)] = left / denom if denom > 1e-12 else 1.0

    def lg(x: float) -> str:
        return f"{math.log10(x):.4f}" if x > 0 else "-99"

    out = ["\\data\\", f"ngram 1={len(vocab) + 1}", f"ngram 2={len(p2)}", f"ngram 3={len(p3)}", "",
           "\\1-grams:", f"-99\t<s>\t{lg(bo1.get('<s>', 1.0))}"]
    for w in vocab:
        out.append(f"{lg(p1[w])}\t{w}" + (f"\t{lg(bo1[w])}" if w in bo1 else ""))
    out += ["", "\\2-grams:"]
    for (a, b), p in sorted(p2.items()):
        out.append(f"{lg(p)}\t{a} {b}" + (f"\t{lg(bo2[(a, b)])}" if (a, b) in bo2 else ""))
    out += ["", "\\3-grams:"]
    for (a, b, c), p in sorted(p3.items()):
        out.append(f"{lg(p)}\t{a} {b} {c}")
    out += ["", "\\end\\", ""]
    return "\n".join(out)


def model_dir() -> Path:
    try:
        import pocketsphinx
    except ImportError:
        raise EngineUnavailable("the pocketsphinx recognizer needs the pocketsphinx package") from None
    return Path(pocketsphinx.get_model_path()) / "en-us"


def restricted_dict(words: set[str], full_dict: Path) -> tuple[str, set[str]]:
    """Lines of the CMU dictionary for ``words`` (all pronunciations); and the words missing."""
    lines, found = [], set()
    with open(full_dict, encoding="utf-8") as fh:
        for line in fh:
            head = line.split(" ", 1)[0]
            base = head.split("(", 1)[0]
            if base in words:
                lines.append(line.rstrip("\n"))
                found.add(base)
    return "\n".join(lines) + "\n", words - found


_FILL_RATIO = 0.3        # high-band noise level / recent speech frame level


@lru_cache(maxsize=1)
def _high_band_noise() -> np.ndarray:
    """One second of unit-RMS noise with energy only in 4.2-7.8 kHz (at 16 kHz), fixed seed."""
    spec = np.fft.rfft(np.random.default_rng(8000).standard_normal(MODEL_RATE))
    f = np.fft.rfftfreq(MODEL_RATE, 1 / MODEL_RATE)
    spec[(f < 4200) | (f > 7800)] = 0
    band = np.fft.irfft(spec, MODEL_RATE)
    return band / band.std()


class _HighBandFill:
    """8 kHz -> 16 kHz for the 16 kHz acoustic model, with the empty 4-8 kHz
    band filled by noise at a level following the speech (see the module
    docstring: measured WER at 8 kHz on the corpus's lines 51% without, 6-8% with)."""

    def __init__(self) -> None:
        self._up = Resampler(8000, MODEL_RATE)
        self._noise = _high_band_noise()
        self._pos = 0
        self._level: float | None = None

    def _fill(self, pcm: bytes) -> bytes:
        y = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        if not y.size:
            return b""
        rms = float(np.sqrt(y @ y / y.size))
        # A peak follower decaying ~1.4 dB per 20 ms: steady through a word,
        # gone within a few hundred ms of silence (else the decoder hears words
        # in the fill after a sentence).
        self._level = rms if self._level is None else max(rms, 0.85 * self._level)
        idx = (self._pos + np.arange(y.size)) % self._noise.size
        self._pos = int((self._pos + y.size) % self._noise.size)
        y += self._noise[idx] * (_FILL_RATIO * self._level)
        return np.clip(np.rint(y), -32768, 32767).astype("<i2").tobytes()

    def process(self, pcm: bytes) -> bytes:
        return self._fill(self._up.process(pcm))

    def flush(self) -> bytes:
        return self._fill(self._up.flush())


class _Stream:
    def __init__(self, rec: "PocketsphinxRecognizer", decoder, rate: int) -> None:
        self._rec = rec
        self._dec = decoder
        self._rate = rate
        self._rs: Any = (None if rate == MODEL_RATE else _HighBandFill() if rate == 8000
                         else Resampler(rate, MODEL_RATE))
        self._since_partial = 0
        self._last_text = ""
        self._open = True
        decoder.start_utt()

    def feed(self, pcm: bytes) -> list[Hyp]:
        if not self._open:
            raise RecognitionError("feed() on a finished recognizer stream")
        data = self._rs.process(pcm) if self._rs else bytes(pcm)
        if not data:
            return []
        try:
            self._dec.process_raw(data, False, False)
        except Exception as exc:  # noqa: BLE001 (C extension errors)
            self.close()
            raise RecognitionError(f"pocketsphinx failed on audio: {exc!r}") from None
        self._since_partial += len(data) // 2
        if self._since_partial * 1000 < self._rec.partial_every_ms * MODEL_RATE:
            return []
        self._since_partial = 0
        hyp = self._dec.hyp()
        text = hyp.hypstr.strip() if hyp is not None else ""
        if text and text != self._last_text:
            self._last_text = text
            return [Hyp(text, False)]
        return []

    def finish(self) -> Hyp:
        if not self._open:
            raise RecognitionError("finish() on a finished recognizer stream")
        try:
            if self._rs is not None:
                tail = self._rs.flush()
                if tail:
                    self._dec.process_raw(tail, False, False)
            self._dec.end_utt()
            hyp = self._dec.hyp()
        except Exception as exc:  # noqa: BLE001
            self._release()
            raise RecognitionError(f"pocketsphinx failed to finish: {exc!r}") from None
        text = hyp.hypstr.strip() if hyp is not None else ""
        if text:
            self._rec._learn_cmn(self._rate, self._dec)
        conf = None
        if hyp is not None and text:
            try:
                conf = round(min(1.0, max(0.0, self._dec.logmath.exp(hyp.prob))), 3)
            except Exception:  # noqa: BLE001 (posterior not computed)
                conf = None
        self._release()
        return Hyp(text, True, conf)

    def close(self) -> None:
        if self._open:
            try:
                self._dec.end_utt()
            except Exception:  # noqa: BLE001
                pass
            self._release()

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._rec._idle[self._rate].append(self._dec)


class PocketsphinxRecognizer:
    """See the module docstring. ``mode``: ``domain`` (default) or ``dictation``."""

    name = "pocketsphinx"

    def __init__(self, mode: str = "domain", corpus: str | os.PathLike | None = None,
                 phrases: list[str] | None = None, partial_every_ms: int = 300,
                 calibrate: bool = True, second_pass: bool = False) -> None:
        if mode not in ("domain", "dictation"):
            raise SpeechError(f"pocketsphinx mode must be 'domain' or 'dictation', got {mode!r}")
        if not 20 <= int(partial_every_ms) <= 10_000:
            raise SpeechError(f"partial_every_ms must be in [20, 10000], got {partial_every_ms}")
        self.mode = mode
        self.calibrate = calibrate
        self.partial_every_ms = int(partial_every_ms)
        mdir = model_dir()
        self._kwargs: dict[str, Any] = dict(hmm=str(mdir / "en-us"), samprate=MODEL_RATE,
                                            loglevel="FATAL", fwdflat=bool(second_pass))
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.vocabulary: set[str] = set()
        if mode == "domain":
            sentences = [tokenize(p) for p in (phrases if phrases is not None else read_corpus(corpus))]
            words = {w for s in sentences for w in s}
            dict_text, missing = restricted_dict(words, mdir / "cmudict-en-us.dict")
            if missing:
                log.warning("recognizer corpus: %d word(s) not in the CMU dictionary, dropped: %s",
                            len(missing), ", ".join(sorted(missing)[:20]))
                sentences = [[w for w in s if w not in missing] for s in sentences]
            self.vocabulary = words - missing
            if not self.vocabulary:
                raise SpeechError("no word of the recognizer corpus is in the CMU dictionary")
            self._tmp = tempfile.TemporaryDirectory(prefix="pv-asr-")
            lm = Path(self._tmp.name) / "domain.lm"
            dic = Path(self._tmp.name) / "domain.dict"
            lm.write_text(build_arpa(sentences), encoding="utf-8")
            dic.write_text(dict_text, encoding="utf-8")
            # A heavier language weight than the general default (6.5): the small
            # domain model is trusted more (measured: 16 kHz WER 7.8% -> 3.9%, two
            # passes). 10 was tuned with the second pass; the first pass alone
            # drops short function words at 10 ("my order not arrived"): 9
            # (asr_bench: 8 kHz 40.3%, 16 kHz 44.2% vs 40.0% / 45.1% with two
            # passes at 10; 8 costs 8 kHz intents; BENCHMARKS.md).
            self._kwargs.update(lm=str(lm), dict=str(dic), lw=10.0 if second_pass else 9.0)
        else:
            self._kwargs.update(lm=str(mdir / "en-us.lm.bin"), dict=str(mdir / "cmudict-en-us.dict"))
        # One pool per input rate: upsampled 8 kHz audio has other cepstral
        # means than 16 kHz audio, and each decoder's live CMN adapts to its own.
        self._idle: dict[int, list] = {8000: [], 16000: [], 32000: []}
        self._cmn: dict[int, str] = {}
        self.decoders_made = 0
        self._idle[8000].append(self._new_decoder())  # fail at start, not on the first caller

    def _new_decoder(self):
        from pocketsphinx import Decoder

        try:
            dec = Decoder(**self._kwargs)
        except Exception as exc:  # noqa: BLE001
            raise EngineUnavailable(f"pocketsphinx could not load its model: {exc!r}") from None
        self.decoders_made += 1
        return dec

    def open(self, rate: int) -> _Stream:
        if rate not in (8000, 16000, 32000) or isinstance(rate, bool):
            raise RecognitionError(f"rate must be 8000, 16000 or 32000, got {rate!r}")
        if rate not in self._cmn and self.calibrate:
            self._calibrate(rate)
        idle = self._idle[rate]
        dec = idle.pop() if idle else self._new_decoder()
        cmn = self._cmn.get(rate)
        if cmn:
            try:
                dec.set_cmn(cmn)
            except Exception:  # noqa: BLE001 (older pocketsphinx)
                pass
        return _Stream(self, dec, rate)

    def _calibrate(self, rate: int) -> None:
        """Prime the cepstral mean for ``rate`` with a built-in synthesized
        sentence passed through the same rate conversion (8 kHz audio lacks
        everything above 4 kHz: its mean is far from the model's 16 kHz default)."""
        self._cmn[rate] = ""  # once, even if it fails
        try:
            from .tts import EspeakSynthesizer
            pcm = EspeakSynthesizer().synthesize_sync(_CALIBRATION, rate)
        except Exception as exc:  # noqa: BLE001 (no espeak: live CMN adapts on its own)
            log.info("recognizer: no CMN calibration at %d Hz (%s)", rate, exc)
            return
        stream = self.open(rate)
        stream.feed(pcm)
        stream.finish()

    def _learn_cmn(self, rate: int, dec) -> None:
        """Remember the channel's cepstral mean after a recognised segment, so a
        decoder new to this rate starts adapted (live CMN otherwise needs one
        utterance to settle, and that first utterance is mostly lost)."""
        try:
            self._cmn[rate] = dec.get_cmn(False)
        except Exception:  # noqa: BLE001
            pass
