"""Settings of the API role: a section of the project's settings
(``piopiy_voice.settings.EnvSection``: each variable declared once here, read
from the environment over ``.env``, ``PV_ANSWER_TOKEN`` also from
``PV_ANSWER_TOKEN_FILE``; bad values raise ``PiopiyConfigError`` naming the
variable). ``piopiy_voice.settings.Settings`` holds what every role shares:
Redis, the signing secret, the gateway's public URL, the caller id.

Answer URL authentication: the platform's inbound POST carries no signature of
its own (its docs define none), so the answer URL is protected by what we
configure on both sides: a shared token (``PV_ANSWER_TOKEN``, given to the
platform inside the answer URL as ``?token=…`` or as the password of HTTP Basic
auth) and/or an allow-list of the platform's source networks
(``PV_ANSWER_ALLOW_IPS``). A request passes when either matches; with neither
configured every inbound request is refused (fail closed).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from pydantic import Field, field_validator

from piopiy_voice.pcmo_models import LISTEN_MODES, VOICE_QUALITIES, parse_pcmo
from piopiy_voice.settings import EnvSection

_CHOICES = {"answer_listen_mode": LISTEN_MODES, "answer_voice_quality": VOICE_QUALITIES}


class ApiSettings(EnvSection):
    SECRETS = ("answer_token",)

    host: str = Field("127.0.0.1", alias="PV_API_HOST")
    port: int = Field(8780, alias="PV_API_PORT", ge=0, le=65535)
    #: Public http(s) base of the API (listen/control URLs handed out are built on it).
    public_url: str = Field("", alias="PV_API_PUBLIC_URL")
    #: Lifetime of signed listen/control URLs (s).
    url_ttl_s: int = Field(3600, alias="PV_API_URL_TTL_S", gt=0, le=7 * 24 * 3600)
    #: Largest request body accepted (bytes); larger is 413.
    max_body_bytes: int = Field(64 * 1024, alias="PV_API_MAX_BODY_BYTES", gt=0)
    #: How long a control request waits for the gateway's answer (s).
    control_timeout_s: float = Field(5.0, alias="PV_API_CONTROL_TIMEOUT_S", gt=0, le=30)
    #: Messages queued per listener before it skips (oldest dropped); 1 s of 20 ms frames.
    listen_queue: int = Field(50, alias="PV_API_LISTEN_QUEUE", ge=5, le=5000)
    #: A listener that sent nothing for this long while its queue overflowed is dropped (s).
    listen_max_stall_s: float = Field(5.0, alias="PV_API_LISTEN_MAX_STALL_S", gt=0, le=60)
    #: Concurrent listen sockets per API process (beyond: 503).
    max_listeners: int = Field(5000, alias="PV_API_MAX_LISTENERS", gt=0)
    #: The supervisor's number: "transfer to the supervisor" bridges there.
    supervisor_number: str = Field("", alias="PV_SUPERVISOR_NUMBER")

    # --- inbound calls (answer URL) -----------------------------------------
    answer_token: str = Field("", alias="PV_ANSWER_TOKEN", repr=False)
    answer_allow_ips: str = Field("", alias="PV_ANSWER_ALLOW_IPS")
    answer_listen_mode: str = Field("both", alias="PV_ANSWER_LISTEN_MODE")
    answer_voice_quality: int = Field(8000, alias="PV_ANSWER_VOICE_QUALITY")
    answer_flow: str = Field("", alias="PV_ANSWER_FLOW")
    #: PCMO actions after the stream (JSON list), e.g. a goodbye and a hangup.
    answer_extra_actions: str = Field("", alias="PV_ANSWER_EXTRA_ACTIONS")
    #: Longest wait for Redis while answering (s); then the answer goes out anyway.
    answer_redis_timeout_s: float = Field(0.5, alias="PV_ANSWER_REDIS_TIMEOUT_S", gt=0, le=5)

    @field_validator("answer_listen_mode", "answer_voice_quality")
    @classmethod
    def _choice(cls, v: Any, info) -> Any:
        allowed = _CHOICES[info.field_name]
        if v not in allowed:
            raise ValueError(f"must be one of {allowed}")
        return v

    @field_validator("answer_allow_ips")
    @classmethod
    def _nets(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            ipaddress.ip_network(part, strict=False)  # ValueError names the bad one
        return v

    @field_validator("answer_extra_actions")
    @classmethod
    def _extra(cls, v: str) -> str:
        if v.strip():
            actions = parse_pcmo(json.loads(v), "PV_ANSWER_EXTRA_ACTIONS")
            if any(a.action == "stream" for a in actions):
                raise ValueError("must not contain a stream action (the answer adds it)")
        return v

    @property
    def allow_networks(self) -> list[Any]:
        return [ipaddress.ip_network(p.strip(), strict=False)
                for p in self.answer_allow_ips.split(",") if p.strip()]

    @property
    def extra_actions(self) -> list[dict[str, Any]]:
        if not self.answer_extra_actions.strip():
            return []
        return [a.to_dict() for a in parse_pcmo(json.loads(self.answer_extra_actions))]

    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")
