"""One BLAS thread per process, for the roles that serve many calls.

The worker and the transcriber score every frame of every call with small
numpy products, and the worker batches them across its calls
(``speech.vad.VoicingBatch``). OpenBLAS would split a batched product over
every core and keep its threads spinning between products: CPU taken from
the same process's loop and from the other processes on the box (measured at
100 calls on one worker, 2 cores: the worker's non-loop CPU went from 32% to
72% of a core, barge-in p99 from ~200 ms to 550-710 ms). Calls, not one
product, are the parallelism here: scale by processes.

Must run before numpy is first imported (OpenBLAS reads its environment when
it loads); ``piopiy_voice.workers`` and ``piopiy_voice.speech`` call it on
import. An explicit ``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS`` wins.
"""

from __future__ import annotations

import os


def single_threaded() -> None:
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
