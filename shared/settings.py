"""Settings: one object, read from the environment, shared by every role.

Every field's alias is the environment variable that sets it. ``Settings.from_env()``
reads them (unknown ``PV_*`` variables are reported, not ignored silently, so a
typo in a compose file shows up in the log); ``Settings.env_names()`` is the
list the deployment checks compare compose files against.

Sources (pydantic-settings), highest first:

1. ``Settings.from_env(**overrides)`` keyword overrides (field name or variable name);
2. the process environment;
3. a ``.env`` file in the working directory (local runs; same ``KEY=VALUE``
   syntax as docker compose's);
4. the field defaults below.

``Settings.from_env(mapping)`` reads that mapping only (no environment, no
``.env``): tests and the local stacks build exact settings that way.

Areas with many knobs of their own keep them next to their code, as an
``EnvSection`` (below): ``speech.config.SpeechConfig`` (PV_VAD, PV_ASR*,
PV_DEEPGRAM_*, PV_TTS*, PV_TURN_*, PV_TRANSCRIBER_*), ``speech.llm.LlmConfig``
(PV_LLM_*) and ``api.config.ApiSettings`` (PV_API_*, PV_ANSWER_*,
PV_SUPERVISOR_NUMBER). Each declares every variable once (a field alias) and
reads the same sources the same way (``EnvSection.from_env``); ``SECTIONS``
lists them, so ``Settings.env_names()`` is every variable the project reads
and none of them is reported unknown. A section's secret fields (``SECRETS``)
may come from a file named by ``<VARIABLE>_FILE`` (a plain value and a file is
an error).

Secrets from files: ``PV_SIGNING_SECRET_FILE`` and ``PIOPIY_APP_TOKEN_FILE``
name a file holding the secret (a Docker or Kubernetes secret mount such as
``/run/secrets/pv_signing_secret``); surrounding whitespace is stripped.
The file wins over the plain variable when that one holds a development
placeholder (the defaults docker-compose.yml fills in); a real plain value
*and* a file is an error, so two different secrets cannot silently disagree.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import PiopiyConfigError

log = logging.getLogger(__name__)

DEV_SECRET = "dev-only-insecure-signing-secret"
#: The ``.env`` file read for local runs (relative to the working directory).
ENV_FILE = ".env"
#: Secret field -> the field naming a file that holds it.
SECRET_FILES = {"signing_secret": "signing_secret_file", "piopiy_app_token": "piopiy_app_token_file"}
#: Development values a secret file may replace (the compose defaults; the
#: second is the sandbox's token, piopiy_voice.sandbox.server.DEV_APP_TOKEN).
DEV_PLACEHOLDERS = frozenset({DEV_SECRET, "sandbox-dev-token"})

#: The area sections (``module:Class``) whose variables ``Settings.env_names()``
#: includes; imported on first use (they are light: no engines load at import).
SECTIONS = (
    "piopiy_voice.speech.config:SpeechConfig",
    "piopiy_voice.speech.llm:LlmConfig",
    "piopiy_voice.api.config:ApiSettings",
)

# Set while ``from_env(mapping)`` builds: read that mapping only, no environment/.env.
_EXPLICIT: ContextVar[bool] = ContextVar("pv_settings_explicit", default=False)


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        populate_by_name=True, extra="ignore", frozen=True,
        env_file=ENV_FILE, env_file_encoding="utf-8", env_ignore_empty=True, case_sensitive=True,
    )

    # --- Redis -----------------------------------------------------------
    redis_url: str | None = Field(None, alias="REDIS_URL")
    #: The Redis of the dialer's RQ queue (RQ needs MULTI over its own keys, which a
    #: cluster refuses across slots): a plain or Sentinel URL. Default: REDIS_URL;
    #: required when REDIS_URL is a cluster URL (``queue_url()``).
    queue_redis_url: str | None = Field(None, alias="PV_QUEUE_REDIS_URL")
    redis_socket_timeout_s: float = Field(10.0, alias="PV_REDIS_SOCKET_TIMEOUT_S", gt=0)
    #: TLS to Redis (``rediss://`` URLs only; see ``redisconn.ssl_context``): the CA
    #: certificate (PEM) that signed the server's certificate (default: the system's
    #: trusted CAs), and a client certificate + key for mutual TLS.
    redis_tls_ca_file: str | None = Field(None, alias="PV_REDIS_TLS_CA_FILE")
    redis_tls_cert_file: str | None = Field(None, alias="PV_REDIS_TLS_CERT_FILE")
    redis_tls_key_file: str | None = Field(None, alias="PV_REDIS_TLS_KEY_FILE")
    #: false: do not verify the server's certificate (logged as INSECURE; tests only).
    redis_tls_verify: bool = Field(True, alias="PV_REDIS_TLS_VERIFY")

    # --- Gateway ---------------------------------------------------------
    gateway_id: str = Field(default_factory=_default_instance_id, alias="PV_GATEWAY_ID")
    gateway_host: str = Field("127.0.0.1", alias="PV_GATEWAY_HOST")
    gateway_port: int = Field(8765, alias="PV_GATEWAY_PORT", ge=0, le=65535)
    #: What the platform dials: the public ws(s):// base of the gateway(s).
    gateway_public_url: str = Field("ws://127.0.0.1:8765", alias="PV_GATEWAY_PUBLIC_URL")
    signing_secret: str = Field(DEV_SECRET, alias="PV_SIGNING_SECRET", min_length=8, repr=False)
    #: File holding the signing secret (Docker/Kubernetes secret mount).
    signing_secret_file: str | None = Field(None, alias="PV_SIGNING_SECRET_FILE")
    #: Life of a signed stream URL (s). Short: a leaked URL is a key to the call;
    #: an ended call's URL is refused (410) whatever its life.
    stream_url_ttl_s: int = Field(3600, alias="PV_STREAM_URL_TTL_S", gt=0)
    #: A call whose socket dropped (no platform stop/hangup, no normal close) stays
    #: resumable this long: the platform may dial the same URL again, here or on
    #: another gateway. Then it ends (``socket_lost``).
    reconnect_grace_s: float = Field(20.0, alias="PV_RECONNECT_GRACE_S", ge=0)
    #: Connections still in the HTTP handshake (not yet admitted or refused) per gateway.
    max_handshakes: int = Field(256, alias="PV_GATEWAY_MAX_HANDSHAKES", gt=0)
    #: Per-call ingress limits; beyond them the gateway stops reading the socket
    #: (TCP back-pressure), so a flooding peer slows only itself.
    ingress_bytes_per_s: int = Field(256 * 1024, alias="PV_INGRESS_BYTES_PER_S", gt=0)
    ingress_frames_per_s: int = Field(500, alias="PV_INGRESS_FRAMES_PER_S", gt=0)
    ingress_text_per_s: int = Field(20, alias="PV_INGRESS_TEXT_PER_S", gt=0)
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
    #: POST the caller's partial transcripts too (``caller_partial``; replies ignored).
    agent_webhook_partials: bool = Field(False, alias="PV_AGENT_WEBHOOK_PARTIALS")
    #: At most this many agent works (model, webhook, synthesis...) run at once per worker.
    agent_runtime_concurrency: int = Field(256, alias="PV_AGENT_RUNTIME_CONCURRENCY", gt=0)
    #: Most calls one worker holds (0: no cap); beyond it new calls wait for another worker.
    worker_max_calls: int = Field(0, alias="PV_WORKER_MAX_CALLS", ge=0)
    #: Most orphaned calls one takeover scan claims (spreads calls after a Redis stall).
    worker_claim_per_scan: int = Field(20, alias="PV_WORKER_CLAIM_PER_SCAN", gt=0)
    #: A busy worker's loop turns are at least this far apart (ms), so each turn
    #: carries several frames per call and the per-turn work (one XREAD over
    #: every owned stream, timers, commits) is paid less often; 0: no floor.
    worker_min_turn_ms: int = Field(20, alias="PV_WORKER_MIN_TURN_MS", ge=0, le=100)
    #: After a takeover, replayed audio commands (speak/play) decided on entries
    #: older than this are not sent (ms; 0: send everything).
    stale_command_ms: int = Field(500, alias="PV_STALE_COMMAND_MS", ge=0)
    #: After the caller's silence, how long a talking agent waits for the final transcript (ms).
    transcript_wait_ms: int = Field(1200, alias="PV_TRANSCRIPT_WAIT_MS", ge=0, le=10_000)
    #: Failed replies in a row before a talking agent hands the call to a human.
    agent_max_failures: int = Field(2, alias="PV_AGENT_MAX_FAILURES", ge=1, le=100)
    #: Messages of conversation history kept per call (sent to the model).
    history_max_messages: int = Field(24, alias="PV_HISTORY_MAX_MESSAGES", ge=2, le=500)
    #: The language-model agent's system prompt ("" = the built-in one).
    system_prompt: str = Field("", alias="PV_SYSTEM_PROMPT")
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
    piopiy_app_token: str | None = Field(None, alias="PIOPIY_APP_TOKEN", repr=False)
    #: File holding the app token (Docker/Kubernetes secret mount).
    piopiy_app_token_file: str | None = Field(None, alias="PIOPIY_APP_TOKEN_FILE")
    piopiy_base_url: str = Field("https://rest.telecmi.com", alias="PIOPIY_BASE_URL")
    piopiy_action_url: str = Field(
        "https://piopiy.telecmi.com/v1/call/action", alias="PIOPIY_ACTION_URL"
    )
    #: Default caller id (the Piopiy number) for dialed calls.
    piopiy_caller_id: str | None = Field(None, alias="PIOPIY_CALLER_ID")
    dial_queue: str = Field("calls", alias="PV_DIAL_QUEUE")
    dial_rate_per_s: float = Field(5.0, alias="PV_DIAL_RATE_PER_S", gt=0)
    campaign_max_live: int = Field(50, alias="PV_CAMPAIGN_MAX_LIVE", gt=0)
    #: A record still ``dialing`` this long after the request went out is marked
    #: failed (``outcome_unknown``): its dialer died mid-request (s).
    dial_stuck_after_s: int = Field(60, alias="PV_DIAL_STUCK_AFTER_S", gt=0)

    # --- Sandbox ---------------------------------------------------------
    sandbox_host: str = Field("127.0.0.1", alias="PV_SANDBOX_HOST")
    sandbox_port: int = Field(8766, alias="PV_SANDBOX_PORT", ge=0, le=65535)
    sandbox_report_dir: str = Field("reports", alias="PV_SANDBOX_REPORT_DIR")

    # --- Common ----------------------------------------------------------
    log_level: str = Field("INFO", alias="PV_LOG_LEVEL")
    #: ``text`` (one readable line) or ``json`` (one object per line, with
    #: role, instance and call_id fields, for log pipelines).
    log_format: Literal["text", "json"] = Field("text", alias="PV_LOG_FORMAT")

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for secret, file_field in SECRET_FILES.items():
            info, finfo = cls.model_fields[secret], cls.model_fields[file_field]
            path = data.get(finfo.alias, data.get(file_field))
            if not path:
                continue
            plain = data.get(info.alias) or data.get(secret)
            if plain and plain not in DEV_PLACEHOLDERS:
                raise ValueError(f"{info.alias} and {finfo.alias} are both set; keep one")
            data.pop(secret, None)
            try:
                value = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"{finfo.alias}: cannot read {path}: {exc.strerror or exc}") from None
            if not value:
                raise ValueError(f"{finfo.alias}: {path} is empty")
            data[info.alias] = value
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _EXPLICIT.get():
            return (init_settings,)
        return (init_settings, env_settings, dotenv_settings)

    @field_validator("redis_url")
    @classmethod
    def _sentinel_url(cls, v: str | None) -> str | None:
        # A malformed Sentinel or cluster URL stops a role at start, in one line (password hidden).
        from .redisconn import (  # noqa: PLC0415 (redis-py: lazily)
            is_cluster_url, is_sentinel_url, parse_cluster_url, parse_sentinel_url,
        )

        try:
            if is_sentinel_url(v):
                parse_sentinel_url(v)
            elif is_cluster_url(v):
                parse_cluster_url(v)
        except PiopiyConfigError as exc:
            raise ValueError(str(exc).removeprefix("REDIS_URL ")) from None
        return v

    @field_validator("queue_redis_url")
    @classmethod
    def _queue_url(cls, v: str | None) -> str | None:
        from .redisconn import (  # noqa: PLC0415
            is_cluster_url, is_sentinel_url, parse_sentinel_url, redact_url,
        )

        if is_cluster_url(v):
            raise ValueError(f"{redact_url(v)} is a cluster URL; RQ needs a plain Redis (or Sentinel): "
                             "redis://host:6379/0")
        if is_sentinel_url(v):
            try:
                parse_sentinel_url(v)
            except PiopiyConfigError as exc:
                raise ValueError(str(exc).removeprefix("REDIS_URL ")) from None
        return v

    def queue_url(self) -> str | None:
        """The Redis URL of the RQ queue: PV_QUEUE_REDIS_URL, else REDIS_URL (None when
        neither is set). ``PiopiyConfigError`` when REDIS_URL is a cluster URL and
        PV_QUEUE_REDIS_URL is not set (RQ cannot run on a cluster)."""
        from .redisconn import is_cluster_url  # noqa: PLC0415

        if self.queue_redis_url:
            return self.queue_redis_url
        if is_cluster_url(self.redis_url):
            raise PiopiyConfigError(
                "REDIS_URL is a Redis Cluster; the dial queue (RQ) needs a plain Redis: set "
                "PV_QUEUE_REDIS_URL (e.g. redis://queue-redis:6379/0)")
        return self.redis_url

    @field_validator("gateway_public_url")
    @classmethod
    def _ws_base(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError(f"must be a ws:// or wss:// URL with a host, got {v!r}")
        return v

    @classmethod
    def own_env_names(cls) -> set[str]:
        """The variables of this object's own fields."""
        return {f.alias for f in cls.model_fields.values() if f.alias}

    @classmethod
    def env_names(cls) -> set[str]:
        """Every environment variable the project reads: these fields and every ``SECTIONS`` one."""
        return cls.own_env_names() | set().union(*(s.env_names() for s in sections()))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from the environment and ``.env`` (``environ`` None), or from
        ``environ`` only; ``overrides`` (field or variable names) win.
        ``PiopiyConfigError`` (a ValueError) names every bad variable."""
        names = cls.own_env_names()
        if environ is None:
            seen = set(os.environ) | set(_dotenv_names(ENV_FILE))
            values: dict[str, Any] = {}
        else:
            seen = set(environ)
            values = {k: v for k, v in environ.items() if k in names and v != ""}
        known = cls.env_names()
        unknown = sorted(k for k in seen if k.startswith("PV_") and k not in known)
        if unknown:
            log.warning("ignoring unknown settings: %s", ", ".join(unknown))
        values.update(overrides)
        token = _EXPLICIT.set(environ is not None)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise PiopiyConfigError(f"bad settings: {describe(cls, exc)}") from None
        finally:
            _EXPLICIT.reset(token)

    @property
    def using_dev_secret(self) -> bool:
        return self.signing_secret == DEV_SECRET


class EnvSection(BaseModel):
    """One area's settings, declared next to its code; read like ``Settings``.

    Subclasses declare fields whose alias is the variable (the one declaration
    of each name) and list themselves in ``SECTIONS``. ``from_env()`` reads the
    environment over ``.env``; ``from_env(mapping)`` that mapping only; empty
    values mean the default. Fields named in ``SECRETS`` may instead come from a
    file named by ``<VARIABLE>_FILE`` (a secret mount). Built directly or from
    the environment, a bad value raises ``ERROR`` (a ``PiopiyConfigError``)
    naming the variable.
    """

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True,
                              str_strip_whitespace=True)
    SECRETS: ClassVar[tuple[str, ...]] = ()
    ERROR: ClassVar[type[Exception]] = PiopiyConfigError

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise self.ERROR(f"bad settings: {describe(type(self), exc)}") from None

    @classmethod
    def secret_files(cls) -> dict[str, str]:
        """Secret variable -> the variable naming a file that holds it."""
        return {cls.model_fields[f].alias: cls.model_fields[f].alias + "_FILE" for f in cls.SECRETS}

    @classmethod
    def env_names(cls) -> set[str]:
        return {f.alias for f in cls.model_fields.values() if f.alias} | set(cls.secret_files().values())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any):
        values = env_values(cls.env_names(), environ)
        for var, file_var in cls.secret_files().items():
            path = values.pop(file_var, None)
            if path is None:
                continue
            if var in values:
                raise cls.ERROR(f"bad settings: {var} and {file_var} are both set; keep one")
            try:
                values[var] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise cls.ERROR(f"bad settings: {file_var}: cannot read {path}: "
                                f"{exc.strerror or exc}") from None
            if not values[var]:
                raise cls.ERROR(f"bad settings: {file_var}: {path} is empty")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any):
        """A copy with ``changes`` (field names), validated like a new one."""
        return type(self)(**{**self.model_dump(), **changes})


@lru_cache(maxsize=1)
def sections() -> tuple[type[EnvSection], ...]:
    out = []
    for spec in SECTIONS:
        module, _, name = spec.partition(":")
        out.append(getattr(importlib.import_module(module), name))
    return tuple(out)


def env_values(names: set[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The non-empty values of ``names``: from ``environ`` only, or (None) from the
    process environment over the ``.env`` file."""
    if environ is None:
        environ = {**_dotenv_values(ENV_FILE), **os.environ}
    return {k: v for k, v in environ.items() if k in names and v not in ("", None)}


def describe(model: type[BaseModel], exc: ValidationError) -> str:
    """One line naming the variable of every error in ``exc``."""
    return "; ".join(_describe(model, err) for err in exc.errors())


def _describe(model: type[BaseModel], err: Mapping[str, Any]) -> str:
    loc = err.get("loc") or ()
    name = str(loc[0]) if loc else ""
    field = model.model_fields.get(name)
    if field is not None and field.alias:
        name = field.alias
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{name}: {msg}" if name else msg


def _dotenv_values(path: str) -> dict[str, str]:
    try:
        from dotenv import dotenv_values  # noqa: PLC0415  (installed with pydantic-settings)
    except ImportError:  # pragma: no cover
        return {}
    try:
        return {k: v for k, v in dotenv_values(path).items() if v is not None} if os.path.isfile(path) else {}
    except OSError:
        return {}


def _dotenv_names(path: str) -> list[str]:
    """Variable names in a ``.env`` file (for the unknown-name warning)."""
    return list(_dotenv_values(path))
