"""The talking agents' configuration (``AgentConfig``): one process-wide view.

``AgentConfig.from_env`` reads the project's settings (``piopiy_voice.settings``
declares the variables) once per process (``env_config``); a test or an
embedding program sets ``ConversationAgent.CONFIG`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

from piopiy_voice.settings import Settings
from piopiy_voice.speech.config import SpeechConfig
from piopiy_voice.speech.llm import LlmConfig

from .history import INTERRUPTED_MARK

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant on a phone call. Answer in one to three short "
    "spoken sentences, no lists, no markdown. Use the tools to hand the caller to a human, "
    "hang up, pause the stream while they enter card numbers, or play music. An assistant "
    f"turn ending in '{INTERRUPTED_MARK.strip()}' was cut off by the caller: they did not "
    "hear the rest."
)


@dataclass(frozen=True)
class AgentConfig:
    """The talking agents' knobs: a view of the project's settings (the
    variables are declared in ``piopiy_voice.settings``: ``Settings`` for the
    agent's own, ``SpeechConfig`` and ``LlmConfig`` sections)."""

    transcript_wait_ms: int = 1200        # PV_TRANSCRIPT_WAIT_MS
    max_failures: int = 2                 # PV_AGENT_MAX_FAILURES (in a row -> hand off)
    history_max: int = 24                 # PV_HISTORY_MAX_MESSAGES
    system_prompt: str = DEFAULT_SYSTEM_PROMPT   # PV_SYSTEM_PROMPT
    speech: SpeechConfig = field(default_factory=SpeechConfig)   # PV_VAD, PV_TTS, PV_TURN_*
    llm: LlmConfig = field(default_factory=LlmConfig)           # PV_LLM_*

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "AgentConfig":
        s = Settings.from_env(env)
        return cls(
            transcript_wait_ms=s.transcript_wait_ms,
            max_failures=s.agent_max_failures,
            history_max=s.history_max_messages,
            system_prompt=s.system_prompt.strip() or DEFAULT_SYSTEM_PROMPT,
            speech=SpeechConfig.from_env(env),
            llm=LlmConfig.from_env(env),
        )


@lru_cache(maxsize=1)
def env_config() -> AgentConfig:
    """The configuration from the environment, read once per process."""
    return AgentConfig.from_env()
