"""Settings: one object, read from the environment, shared by every role.

Every field's alias is the environment variable that sets it. ``Settings.from_env()``
reads them (unknown ``PV_*`` variables are reported, not ignored silently, so a
typo in a compose file shows up in the log); ``Settings.env_names()`` is the
list the deployment checks compare compose files against.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

DEV_SECRET = "dev-only-insecure-signing-secret"


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    # --- Redis -----------------------------------------------------------
    redis_url: str | None = Field(None, alias="REDIS_URL")
    redis_socket_timeout_s: float = Field(10.0, alias="PV_REDIS_SOCKET_TIMEOUT_S", gt=0)

    # --- Gateway ---------------------------------------------------------
    gateway_id: str = Field(default_factory=_default_instance_id, alias="PV_GATEWAY_ID")
    gateway_host: str = Field("127.0.0.1", alias="PV_GATEWAY_HOST")
    gateway_port: int = Field(8765, alias="PV_GATEWAY_PORT", ge=0, le=65535)
    #: What the platform dials: the public ws(s):// base of the gateway(s).
    gateway_public_url: str = Field("ws://127.0.0.1:8765", alias="PV_GATEWAY_PUBLIC_URL")
    signing_secret: str = Field(DEV_SECRET, alias="PV_SIGNING_SECRET", min_length=8)
    stream_url_ttl_s: int = Field(24 * 3600, alias="PV_STREAM_URL_TTL_S", gt=0)
    drain_grace_s: float = Field(30.0, alias="PV_DRAIN_GRACE_S", ge=0)
    max_calls: int = Field(2000, alias="PV_GATEWAY_MAX_CALLS", gt=0)
    max_frame_bytes: int = Field(64 * 1024, alias="PV_MAX_FRAME_BYTES", gt=0)
    #: Audio queued for one call's playout beyond this is refused (ms).
    max_outbound_queue_ms: int = Field(120_000, alias="PV_MAX_OUTBOUND_QUEUE_MS", gt=0)
    #: How far ahead of real time outbound audio is sent to the platform (ms).
    playout_lead_ms: int = Field(100, alias="PV_PLAYOUT_LEAD_MS", ge=0)
    #: Audio kept while Redis is unreachable, per gateway, before dropping (frames).
    redis_buffer_frames: int = Field(50_000, alias="PV_REDIS_BUFFER_FRAMES", gt=0)

    # --- Workers ---------------------------------------------------------
    worker_id: str = Field(default_factory=_default_instance_id, alias="PV_WORKER_ID")
    lease_ms: int = Field(5000, alias="PV_LEASE_MS", gt=100)
    agent: str = Field("piopiy_voice.workers.agent.default:DefaultAgent", alias="PV_AGENT")
    agent_webhook_url: str | None = Field(None, alias="PV_AGENT_WEBHOOK_URL")
    agent_webhook_timeout_s: float = Field(2.0, alias="PV_AGENT_WEBHOOK_TIMEOUT_S", gt=0)
    handoff_key: str = Field("0", alias="PV_HANDOFF_KEY", min_length=1, max_length=1)
    pause_key: str = Field("*", alias="PV_PAUSE_KEY", min_length=1, max_length=1)
    pause_resume_after_s: float = Field(20.0, alias="PV_PAUSE_RESUME_AFTER_S", gt=0)
    human_agent_number: str = Field("919000000001", alias="PV_HUMAN_AGENT_NUMBER")
    silence_timeout_s: float = Field(8.0, alias="PV_SILENCE_TIMEOUT_S", gt=0)
    max_call_s: float = Field(600.0, alias="PV_MAX_CALL_S", gt=0)
    #: Music on hold while a transfer rings (platform file name or http(s) URL).
    hold_music: str = Field("hold_music.wav", alias="PV_HOLD_MUSIC", min_length=1)

    # --- Piopiy REST / dialer -------------------------------------------
    piopiy_app_id: int | None = Field(None, alias="PIOPIY_APP_ID")
    piopiy_app_token: str | None = Field(None, alias="PIOPIY_APP_TOKEN")
    piopiy_base_url: str = Field("https://rest.telecmi.com", alias="PIOPIY_BASE_URL")
    piopiy_action_url: str = Field(
        "https://piopiy.telecmi.com/v1/call/action", alias="PIOPIY_ACTION_URL"
    )
    #: Default caller id (the Piopiy number) for dialed calls.
    piopiy_caller_id: str | None = Field(None, alias="PIOPIY_CALLER_ID")
    dial_queue: str = Field("calls", alias="PV_DIAL_QUEUE")
    dial_rate_per_s: float = Field(5.0, alias="PV_DIAL_RATE_PER_S", gt=0)
    campaign_max_live: int = Field(50, alias="PV_CAMPAIGN_MAX_LIVE", gt=0)

    # --- Sandbox ---------------------------------------------------------
    sandbox_host: str = Field("127.0.0.1", alias="PV_SANDBOX_HOST")
    sandbox_port: int = Field(8766, alias="PV_SANDBOX_PORT", ge=0, le=65535)
    sandbox_report_dir: str = Field("reports", alias="PV_SANDBOX_REPORT_DIR")

    # --- Common ----------------------------------------------------------
    log_level: str = Field("INFO", alias="PV_LOG_LEVEL")

    @field_validator("gateway_public_url")
    @classmethod
    def _ws_base(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError(f"must be a ws:// or wss:// URL with a host, got {v!r}")
        return v

    @classmethod
    def env_names(cls) -> set[str]:
        """Every environment variable this object reads."""
        return {f.alias for f in cls.model_fields.values() if f.alias}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        env = os.environ if environ is None else environ
        names = cls.env_names()
        values: dict[str, Any] = {k: v for k, v in env.items() if k in names and v != ""}
        unknown = sorted(k for k in env if k.startswith("PV_") and k not in names)
        if unknown:
            log.warning("ignoring unknown settings: %s", ", ".join(unknown))
        values.update(overrides)
        try:
            settings = cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{err['loc'][0] if err['loc'] else '?'}: {err['msg']}" for err in exc.errors()
            )
            raise ValueError(f"bad settings: {problems}") from None
        return settings

    @property
    def using_dev_secret(self) -> bool:
        return self.signing_secret == DEV_SECRET
