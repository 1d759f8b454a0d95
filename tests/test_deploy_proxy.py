"""deploy/Caddyfile: TLS in front of the gateways and the api, as Caddy reads it.

``caddy adapt`` (Debian's ``caddy`` package) turns the Caddyfile into the JSON
Caddy runs, with the compose service's environment; the routes and the
certificate issuer are checked on that, not on the text. Skipped only when
caddy is absent and CI is not set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from piopiy_voice.compose import ComposeFile
from piopiy_voice.signing import CALL_PATH_PREFIX

ROOT = Path(__file__).resolve().parent.parent
CADDYFILE = ROOT / "deploy" / "Caddyfile"


@pytest.fixture(scope="module")
def caddy():
    tool = shutil.which("caddy")
    if tool is None:
        msg = "caddy not installed (Debian: apt-get install -y caddy)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " -- required in CI")
        pytest.skip(msg)
    return tool


@pytest.fixture(scope="module")
def compose():
    return ComposeFile(ROOT / "docker-compose.yml", environ={})


def adapt(caddy, env: dict[str, str]) -> dict:
    res = subprocess.run([caddy, "adapt", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **env})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def routes(cfg: dict) -> tuple[list[str], list[dict]]:
    (server,) = cfg["apps"]["http"]["servers"].values()
    (site,) = server["routes"]
    (host_match,) = site["match"]
    (sub,) = site["handle"]
    return host_match["host"], sub["routes"]


def upstream_of(route: dict) -> dict | int:
    (handler,) = route["handle"][0]["routes"][0]["handle"]
    if handler["handler"] == "static_response":
        return handler["status_code"]
    return handler["dynamic_upstreams"]


def test_local_default_routes_and_internal_ca(caddy, compose):
    env = compose.environment("caddy")
    assert env == {"CADDY_DOMAIN": "localhost", "CADDY_TLS": "internal"}
    cfg = adapt(caddy, env)
    hosts, rs = routes(cfg)
    assert hosts == ["localhost"]
    (server,) = cfg["apps"]["http"]["servers"].values()
    assert server["listen"] == [":443"]
    (policy,) = cfg["apps"]["tls"]["automation"]["policies"]
    assert policy["issuers"] == [{"module": "internal"}]
    by_path = {tuple(r["match"][0]["path"]) if r.get("match") else None: upstream_of(r) for r in rs}
    gw_port = int(compose.environment("gateway")["PV_GATEWAY_PORT"])
    api_port = int(compose.environment("api")["PV_API_PORT"])
    # The platform's sockets (the signed URL's path) -> every gateway replica.
    assert by_path[(CALL_PATH_PREFIX + "*",)] == {"source": "a", "name": "gateway", "port": str(gw_port),
                                                  "refresh": 5_000_000_000}
    assert by_path[None]["name"] == "api" and by_path[None]["port"] == str(api_port)
    assert by_path[("/metrics",)] == 404
    # Routes are tried in order: /metrics before the api's catch-all.
    assert [r.get("match", [{}])[0].get("path") for r in rs][-1] is None
    assert cfg["admin"]["listen"] == "127.0.0.1:2019"


def test_a_real_domain_gets_acme(caddy):
    cfg = adapt(caddy, {"CADDY_DOMAIN": "voice.example.com", "CADDY_TLS": "ops@example.com"})
    hosts, _ = routes(cfg)
    assert hosts == ["voice.example.com"]
    (policy,) = cfg["apps"]["tls"]["automation"]["policies"]
    assert policy["subjects"] == ["voice.example.com"]
    assert any(i["module"] == "acme" and i.get("email") == "ops@example.com" for i in policy["issuers"])


def test_the_health_check_reaches_the_admin_endpoint(compose):
    test = compose.healthcheck("caddy")
    assert test[:2] == ["CMD", "wget"] and test[-1] == "http://127.0.0.1:2019/config/"
