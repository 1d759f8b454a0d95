"""``RestClient``: place calls with a PCMO and act on live calls (legacy Piopiy REST API).

Theory of operation
-------------------
Everything is validated before a byte is sent (``PiopiyValidationError``). A
request then gets one of three outcomes: a JSON reply with ``code`` 200 (returned
as a dict), a refusal (``PiopiyApiError``: an HTTP error status, or a 200 reply
whose JSON ``code`` is not 200 — the platform reports 420 auth, 422 missing
property, 404 bad music file, 502 that way), or no reply (``PiopiyNetworkError``).

Retry policy — why it is narrow
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A make-call request that reached the platform may already be ringing a person.
Sending it again can ring them twice, so a make-call is retried only when the
request provably was not processed:

* it never reached the server: connection refused, DNS failure, connect
  timeout (``PiopiyNetworkError.reached`` is False);
* the server said it did not process it: HTTP 429 or 503, after the
  ``Retry-After`` delay when given (a delay longer than ``max_retry_after``
  is not waited for: the error is raised with ``retry_after`` set), else after
  exponential backoff (``backoff * 2**n``).

Never retried for make-call: read timeouts and connection resets after sending
(the request may have been processed: ``reached`` is True), other 5xx, any 4xx,
error codes inside a 200 reply. The caller (the dialer) decides, knowing the
call's history, whether to try again. Call actions (hangup/hold/unhold) are
idempotent, so they are also retried on read timeouts and 500/502/504.
At most ``max_retries`` retries; every wait is bounded.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import socket
import time
from typing import Any, Callable, Iterator, Mapping

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from .errors import PiopiyApiError, PiopiyNetworkError, PiopiyValidationError
from .pcmo import Action
from .pcmo_models import check_int, check_number, check_text, pcmo_to_list

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://rest.telecmi.com"
DEFAULT_ACTION_URL = "https://piopiy.telecmi.com/v1/call/action"
INDIA_NUMBER = re.compile(r"91[6789]\d{9}")
CALL_OPTIONS = ("loop", "timeout", "duration", "extra_params")
#: Statuses meaning "not processed, try later".
RETRY_STATUSES = frozenset({429, 503})
#: Also retried for idempotent call actions.
IDEMPOTENT_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def _check_base(url: Any, field: str) -> str:
    if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise PiopiyValidationError(field, f"must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def _check_timeout(timeout: Any) -> tuple[float, float]:
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        timeout = (timeout, timeout)
    if (not isinstance(timeout, (tuple, list)) or len(timeout) != 2
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in timeout)):
        raise PiopiyValidationError("timeout", f"must be (connect_s, read_s), both > 0, got {timeout!r}")
    return float(timeout[0]), float(timeout[1])


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend((e.__cause__, e.__context__, getattr(e, "reason", None), *e.args))


def _never_sent(exc: requests.RequestException) -> bool:
    """True only when the request provably never reached the server."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.SSLError):
        # Usually a handshake failure, but TLS errors can also surface mid-reply: not proof.
        return False
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return False
    if isinstance(exc, requests.exceptions.ConnectionError):
        # urllib3's NewConnectionError (refused, DNS: NameResolutionError) subclasses
        # ConnectTimeoutError: all are raised before any request byte is written.
        return any(
            isinstance(e, (NewConnectionError, ConnectTimeoutError, ConnectionRefusedError, socket.gaierror))
            for e in _exception_chain(exc)
        )
    return False


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _payload(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


class RestClient:
    """Client of the legacy Piopiy REST API: ``client.voice.call(...)``, ``client.voice.hangup(...)``.

    ``base_url`` serves ``/v2/ind_pcmo_make_call`` and ``/v2/global_pcmo_make_call``;
    ``action_url`` is the full call-action endpoint (the local sandbox serves both
    under ``http://127.0.0.1:PORT``). ``timeout`` is (connect, read) seconds.
    Pass ``session`` to share a connection pool (it is then not closed by ``close()``).
    """

    def __init__(
        self,
        app_id: int | str,
        app_token: str,
        base_url: str = DEFAULT_BASE_URL,
        action_url: str = DEFAULT_ACTION_URL,
        timeout: float | tuple[float, float] = (3.05, 15),
        session: requests.Session | None = None,
        max_retries: int = 2,
        backoff: float = 0.5,
        *,
        max_retry_after: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.app_id = check_int(app_id, "app_id", minimum=1)
        self.app_token = check_text(app_token, "app_token")
        self.base_url = _check_base(base_url, "base_url")
        self.action_url = _check_base(action_url, "action_url")
        self.timeout = _check_timeout(timeout)
        self.max_retries = check_int(max_retries, "max_retries", minimum=0, maximum=10)
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff < 0:
            raise PiopiyValidationError("backoff", f"must be a number >= 0, got {backoff!r}")
        self.backoff = float(backoff)
        if (isinstance(max_retry_after, bool) or not isinstance(max_retry_after, (int, float))
                or max_retry_after < 0):
            raise PiopiyValidationError(
                "max_retry_after", f"must be a number >= 0, got {max_retry_after!r}")
        self.max_retry_after = float(max_retry_after)
        self._sleep = sleep
        self._own_session = session is None
        self.session = session if session is not None else requests.Session()
        self.voice = Voice(self)

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> "RestClient":
        """Build from ``piopiy_voice.settings.Settings`` (PIOPIY_* variables)."""
        if settings.piopiy_app_id is None or not settings.piopiy_app_token:
            raise PiopiyValidationError("PIOPIY_APP_ID", "PIOPIY_APP_ID and PIOPIY_APP_TOKEN must be set")
        return cls(settings.piopiy_app_id, settings.piopiy_app_token,
                   base_url=settings.piopiy_base_url, action_url=settings.piopiy_action_url, **kwargs)

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> "RestClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:  # never show the token
        return f"RestClient(app_id={self.app_id}, base_url={self.base_url!r})"

    # -- transport -------------------------------------------------------------

    def _credentials(self) -> dict[str, Any]:
        return {"appid": self.app_id, "secret": self.app_token}

    def post(self, url: str, body: Mapping[str, Any], *, idempotent: bool) -> dict[str, Any]:
        """POST JSON and apply the retry policy of the module docstring."""
        retry_statuses = IDEMPOTENT_RETRY_STATUSES if idempotent else RETRY_STATUSES
        attempt = 0
        while True:
            attempt += 1
            delay = self.backoff * (2 ** (attempt - 1))
            try:
                resp = self.session.post(url, json=body, timeout=self.timeout)
            except requests.RequestException as exc:
                reached = not _never_sent(exc)
                retry = (not reached or (idempotent and isinstance(
                    exc, (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError))))
                if retry and not isinstance(exc, requests.exceptions.SSLError) and attempt <= self.max_retries:
                    log.warning("POST %s failed (%s: %s); retry %d/%d in %.2fs", url,
                                type(exc).__name__, exc, attempt, self.max_retries, delay)
                    self._sleep(delay)
                    continue
                what = "may have reached the server" if reached else "did not reach the server"
                raise PiopiyNetworkError(
                    f"POST {url} failed after {attempt} attempt(s), request {what}: {exc}",
                    reached=reached, attempts=attempt,
                ) from exc
            with resp:
                status = resp.status_code
                payload = _payload(resp)
                wait = _retry_after(resp.headers.get("Retry-After"))
            if status in retry_statuses:
                if attempt <= self.max_retries and (wait is None or wait <= self.max_retry_after):
                    delay = delay if wait is None else wait
                    log.warning("POST %s got HTTP %d; retry %d/%d in %.2fs", url, status,
                                attempt, self.max_retries, delay)
                    self._sleep(delay)
                    continue
            if status >= 400:
                code = payload.get("code") if isinstance(payload, dict) else None
                raise PiopiyApiError(status, _as_code(code) or status, payload,
                                     retry_after=wait, attempts=attempt)
            if not isinstance(payload, dict):
                raise PiopiyApiError(status, None, payload, attempts=attempt)
            code = _as_code(payload.get("code"))
            if code is not None and code != 200:
                raise PiopiyApiError(status, code, payload, attempts=attempt)
            return payload


def _as_code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


class Voice:
    """``client.voice``: make calls and act on live ones."""

    def __init__(self, client: RestClient) -> None:
        self._client = client

    def call(self, to: Any, piopiy_number: Any, pcmo: Any,
             options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Place a call from ``piopiy_number`` (your caller id) to ``to``.

        ``pcmo`` is a builder (read without emptying it), a list of actions, the
        JSON string ``StreamAction.PCMO()`` returns — or a plain phone number
        (legacy form): the call is then bridged to that number, with ``loop`` and
        ``timeout`` of ``options`` in the bridge action.
        ``options``: ``duration`` (max call seconds, default 5400),
        ``extra_params`` (dict echoed back in call events), ``loop``/``timeout``
        (number form only). Returns the platform's reply (``request_id`` inside).
        Numbers go on the wire as ints. See the module docstring for retries.
        """
        client = self._client
        if options is not None and not isinstance(options, Mapping):
            raise PiopiyValidationError("options", f"must be a dict, got {type(options).__name__}")
        opts = dict(options or {})
        for key in opts:
            if key not in CALL_OPTIONS:
                raise PiopiyValidationError(
                    f"options.{key}", f"unknown option; expected one of {', '.join(CALL_OPTIONS)}")
        to_n = check_number(to, "to")
        from_n = check_number(piopiy_number, "piopiy_number")
        duration = check_int(opts.get("duration", 5400), "options.duration", minimum=1, maximum=86400)
        extra = opts.get("extra_params", {})
        if not isinstance(extra, dict):
            raise PiopiyValidationError("options.extra_params", f"must be a dict, got {type(extra).__name__}")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise PiopiyValidationError("options.extra_params", f"must be JSON-serialisable ({exc})") from None

        if _is_number_form(pcmo):
            bridge = {k: opts[k] for k in ("loop", "timeout") if k in opts}
            bridge["duration"] = duration
            actions = Action().call(check_number(pcmo, "pcmo"), from_n, bridge).PCMO()
        else:
            for key in ("loop", "timeout"):
                if key in opts:
                    raise PiopiyValidationError(
                        f"options.{key}", "only applies when pcmo is a number to connect; "
                        "put it in the PCMO's bridge action instead")
            actions = pcmo_to_list(pcmo, "pcmo")

        path = "/v2/ind_pcmo_make_call" if INDIA_NUMBER.fullmatch(str(from_n)) else "/v2/global_pcmo_make_call"
        body = {**client._credentials(), "from": from_n, "to": to_n, "duration": duration,
                "extra_params": extra, "pcmo": actions}
        return client.post(client.base_url + path, body, idempotent=False)

    def _action(self, cmiuuid: Any, action: str, *, idempotent: bool) -> dict[str, Any]:
        uuid = check_text(cmiuuid, "cmiuuid").strip()
        client = self._client
        body = {**client._credentials(), "cmiuuid": uuid, "action": action}
        return client.post(client.action_url, body, idempotent=idempotent)

    def hangup(self, cmiuuid: str) -> dict[str, Any]:
        return self._action(cmiuuid, "hangup", idempotent=True)

    def hold(self, cmiuuid: str) -> dict[str, Any]:
        return self._action(cmiuuid, "hold", idempotent=True)

    def unhold(self, cmiuuid: str) -> dict[str, Any]:
        return self._action(cmiuuid, "unhold", idempotent=True)

    def hold_toggle(self, cmiuuid: str) -> dict[str, Any]:
        """Toggle hold; not idempotent, so only retried where nothing was sent."""
        return self._action(cmiuuid, "holdToggle", idempotent=False)


def _is_number_form(pcmo: Any) -> bool:
    if isinstance(pcmo, bool):
        return False
    if isinstance(pcmo, int):
        return True
    if isinstance(pcmo, str):
        text = pcmo.strip()
        return bool(text) and text.lstrip("+").isdigit()
    return False
