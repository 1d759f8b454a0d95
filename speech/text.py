"""Cut a stream of model tokens into speakable pieces as early as possible.

``SentenceSplitter.push(token)`` returns the pieces that are complete now;
``flush()`` returns the rest at the end of the reply. A piece ends at a
sentence end (``. ! ?`` followed by a space, or a newline), not after common
abbreviations ("Dr.", "e.g.") or inside numbers ("3.5"). To get the first
audio out sooner, the *first* piece may also end at a clause break (``, ; :``
or a dash) once it has ``first_min_chars`` characters; later pieces wait for
sentence ends unless they grow past ``max_chars`` (then they break at the last
clause break or space). Markdown emphasis and code marks are dropped: they
are not speech.
"""

from __future__ import annotations

import re
from typing import AsyncIterator, Iterable, Iterator

_ABBREV = {"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "no", "jr", "sr", "prof", "inc"}
_MARKUP = re.compile(r"[*_`#]+")


class SentenceSplitter:
    def __init__(self, first_min_chars: int = 20, max_chars: int = 220) -> None:
        self.first_min_chars = first_min_chars
        self.max_chars = max_chars
        self._buf = ""
        self._emitted = 0

    def push(self, token: str) -> list[str]:
        self._buf += _MARKUP.sub("", token)
        out = []
        while True:
            cut = self._find_cut()
            if cut is None:
                break
            piece, self._buf = self._buf[:cut].strip(), self._buf[cut:].lstrip()
            if piece:
                out.append(piece)
                self._emitted += 1
        return out

    def flush(self) -> list[str]:
        piece, self._buf = self._buf.strip(), ""
        return [piece] if piece else []

    def _find_cut(self) -> int | None:
        b = self._buf
        for m in re.finditer(r"[.!?]+[\"')\]]*(?=\s)|\n", b):
            end = m.end()
            if m.group().startswith(".") and self._is_abbrev_or_number(b, m.start()):
                continue
            return end
        if self._emitted == 0 and len(b) >= self.first_min_chars:
            m = None
            for m in re.finditer(r"[,;:]\s|\s[-–—]\s", b):
                pass
            if m is not None and m.start() >= self.first_min_chars // 2:
                return m.end()
        if len(b) > self.max_chars:
            head = b[: self.max_chars]
            pos = max(head.rfind(", "), head.rfind("; "), head.rfind(": "))
            if pos <= 0:
                pos = head.rfind(" ")
            return pos + 1 if pos > 0 else self.max_chars
        return None

    @staticmethod
    def _is_abbrev_or_number(b: str, dot: int) -> bool:
        word = re.search(r"([A-Za-z.]+)$", b[:dot])
        if word and word.group(1).lower().rstrip(".") in _ABBREV:
            return True
        return dot > 0 and b[dot - 1].isdigit() and dot + 1 < len(b) and b[dot + 1].isdigit()


def split_sentences(tokens: Iterable[str], **opts) -> Iterator[str]:
    """Pieces of a token stream, each as soon as it is complete."""
    sp = SentenceSplitter(**opts)
    for tok in tokens:
        yield from sp.push(tok)
    yield from sp.flush()


async def asplit_sentences(tokens: AsyncIterator[str], **opts) -> AsyncIterator[str]:
    """``split_sentences`` for an async token stream (a streamed model reply)."""
    sp = SentenceSplitter(**opts)
    async for tok in tokens:
        for piece in sp.push(tok):
            yield piece
    for piece in sp.flush():
        yield piece
