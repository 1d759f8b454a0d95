"""Settings that behave, Redis never picked silently, secrets never logged, --version."""

from __future__ import annotations

import logging

import pytest

from piopiy_voice import cli, redisconn
from piopiy_voice.errors import PiopiyConfigError
from piopiy_voice.redisconn import RedisNotConfigured, redact_url, resolve_redis_url
from piopiy_voice.settings import DEV_SECRET, Settings


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No PV_/PIOPIY_/REDIS_URL variables, cwd an empty dir (no .env)."""
    import os

    for name in list(os.environ):
        if name.startswith(("PV_", "PIOPIY_")) or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield tmp_path
    root.handlers[:] = handlers  # cli.main set up role logging
    root.setLevel(level)


def test_dotenv_is_read_and_the_environment_wins(clean_env, monkeypatch, caplog):
    (clean_env / ".env").write_text("PV_GATEWAY_PORT=9100\nPIOPIY_APP_ID=5\nPV_TYPO=1\n")
    with caplog.at_level(logging.WARNING):
        s = Settings.from_env()
    assert (s.gateway_port, s.piopiy_app_id) == (9100, 5)
    assert "PV_TYPO" in caplog.text
    monkeypatch.setenv("PV_GATEWAY_PORT", "9200")
    assert Settings.from_env().gateway_port == 9200
    # An explicit mapping reads that mapping only.
    assert Settings.from_env({}).gateway_port == 8765


def test_secrets_from_files(clean_env, monkeypatch):
    secret = clean_env / "pv_signing_secret"
    secret.write_text("  from-a-mounted-file\n")
    token = clean_env / "token"
    token.write_text("tok-123456\n")
    s = Settings.from_env({"PV_SIGNING_SECRET_FILE": str(secret), "PIOPIY_APP_TOKEN_FILE": str(token)})
    assert (s.signing_secret, s.piopiy_app_token) == ("from-a-mounted-file", "tok-123456")
    assert "from-a-mounted-file" not in repr(s) and "tok-123456" not in repr(s)
    # The file replaces the development defaults compose fills in...
    s = Settings.from_env({"PV_SIGNING_SECRET": DEV_SECRET, "PV_SIGNING_SECRET_FILE": str(secret)})
    assert s.signing_secret == "from-a-mounted-file"
    # ...but a real plain value and a file must not silently disagree.
    with pytest.raises(PiopiyConfigError, match="PV_SIGNING_SECRET and PV_SIGNING_SECRET_FILE"):
        Settings.from_env({"PV_SIGNING_SECRET": "another-real-one", "PV_SIGNING_SECRET_FILE": str(secret)})
    with pytest.raises(PiopiyConfigError, match="PIOPIY_APP_TOKEN_FILE: cannot read"):
        Settings.from_env({"PIOPIY_APP_TOKEN_FILE": str(clean_env / "missing")})
    # From the process environment too.
    monkeypatch.setenv("PV_SIGNING_SECRET_FILE", str(secret))
    assert Settings.from_env().signing_secret == "from-a-mounted-file"


def test_log_format_is_a_setting():
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"PV_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(PiopiyConfigError, match="PV_LOG_FORMAT"):
        Settings.from_env({"PV_LOG_FORMAT": "xml"})


def test_version(capsys):
    from piopiy_voice import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"piopiy-voice {__version__}"


def test_redact_url():
    assert redact_url("rediss://:hunter2@redis.example:6380/0") == "rediss://:***@redis.example:6380/0"
    assert redact_url("redis://app:hunter2@h:1/0") == "redis://app:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url(None) == "None"


def test_production_resolution_never_guesses(clean_env):
    with pytest.raises(RedisNotConfigured, match="REDIS_URL is not set"):
        resolve_redis_url()
    with pytest.raises(RedisNotConfigured):
        redisconn.connect()
    assert resolve_redis_url("redis://given:1/0") == "redis://given:1/0"


def test_local_stacks_get_a_private_server(clean_env, monkeypatch):
    monkeypatch.setattr(redisconn, "_embedded", None)
    url = resolve_redis_url(local=True, export=False)
    try:
        assert url != "redis://127.0.0.1:6379/0" and redisconn.connect(url).ping()
    finally:
        redisconn._embedded.close()
        monkeypatch.setattr(redisconn, "_embedded", None)


@pytest.mark.parametrize("role", ["gateway", "worker", "dialer"])
def test_production_roles_exit_2_without_redis_url(role, clean_env, capsys):
    assert cli.main([role]) == 2
    err = capsys.readouterr().err
    assert f"piopiy-voice {role}: REDIS_URL is not set" in err
