"""The offline brain: a caller's final transcript -> an intent and what to say.

Rules, not a model: each intent is a list of word patterns matched on the
lower-cased transcript with punctuation removed (recognisers differ in what
they emit: pocketsphinx gives bare lower-case words, network engines give
punctuated sentences). The first intent in ``RULES`` order that matches wins,
so asking for a person beats everything, and "bye" beats a question in the
same breath. Anything else non-empty gets the generic acknowledgement; an
empty transcript is ``unintelligible``.

The patterns also cover what the offline recogniser typically keeps of a
request (measured with ``bench/voice_bench.py intents``): the last word of
"speak to a real person" or "put me through to customer service" is often
lost or misheard, so "speak to", "talk to", "to a real" and "put me through"
hand off too, and "what can you" asks what we can do.

``action`` tells the agent what to do besides talking: ``handoff`` (hold
notice, music, transfer to a human), ``goodbye`` (say goodbye, hang up).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Intent:
    name: str
    reply: str = ""
    action: str | None = None     # None | "handoff" | "goodbye"


_WORDS = r"\b(?:{})\b"
RULES: tuple[tuple[str, str, str | None, str], ...] = (
    # name, patterns (regex alternatives), action, reply
    ("handoff", r"human|humans|real person|a person|to a person|someone|somebody|operator|"
                r"representative|an agent|the agent|live agent|customer service|manager|"
                # what a recogniser keeps of "speak to a real person" / "put me through to..."
                r"speak to|talk to|speak with|talk with|to a real|put me through|transfer me|connect me",
     "handoff", ""),
    ("goodbye", r"bye|goodbye|good bye|that is all|that's all|thats all|that is it|that's it|"
                r"nothing else|no thank you|no thanks|hang up",
     "goodbye", ""),
    ("hours", r"hours|open|opening|close|closing|closed|what time|when are you",
     None, "We are open Monday to Friday, from nine in the morning to six in the evening."),
    ("order_status", r"order|orders|delivery|deliver|package|parcel|shipment|shipping|track|tracking",
     None, "Your order is on its way. It should arrive within two days. Anything else?"),
    ("capabilities", r"what can you do|what can you|what do you do|who are you|help me|help|what are you",
     None, "I can tell you our opening hours, check on an order, or connect you to a person. "
           "What would you like?"),
    ("thanks", r"thank you|thanks|thank",
     None, "You're welcome. Is there anything else?"),
    ("greeting", r"hello|hi|hey|good morning|good afternoon|good evening|hiya",
     None, "Hello! I can tell you our opening hours, check on an order, or connect you to a person. "
           "What would you like?"),
)
_COMPILED = tuple((name, re.compile(_WORDS.format(pats)), action, reply)
                  for name, pats, action, reply in RULES)
FALLBACK = Intent("other", "Thank you, I have noted that. Anything else?")
UNINTELLIGIBLE = Intent("unintelligible")
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.lower().replace("’", "'")).split())


def classify(text: str) -> Intent:
    """The caller's words -> the intent that answers them (see the module docstring)."""
    words = normalize(text if isinstance(text, str) else "")
    if not words:
        return UNINTELLIGIBLE
    for name, pattern, action, reply in _COMPILED:
        if pattern.search(words):
            return Intent(name, reply, action)
    return FALLBACK
