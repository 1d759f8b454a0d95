import logging

import pytest

from piopiy_voice import keys
from piopiy_voice.settings import Settings


def test_settings_read_from_environment_by_alias():
    s = Settings.from_env({"PV_GATEWAY_PORT": "9001", "REDIS_URL": "redis://h:1/2", "PIOPIY_APP_ID": "42"})
    assert s.gateway_port == 9001
    assert s.redis_url == "redis://h:1/2"
    assert s.piopiy_app_id == 42


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="PV_LEASE_MS"):
        Settings.from_env({"PV_LEASE_MS": "soon"})
    with pytest.raises(ValueError, match="PV_SIGNING_SECRET"):
        Settings.from_env({"PV_SIGNING_SECRET": "short"})


def test_unknown_pv_variables_are_reported(caplog):
    with caplog.at_level(logging.WARNING):
        Settings.from_env({"PV_GATEWAY_PROT": "1"})
    assert "PV_GATEWAY_PROT" in caplog.text


def test_env_names_lists_every_alias():
    names = Settings.env_names()
    assert {"REDIS_URL", "PV_SIGNING_SECRET", "PIOPIY_APP_TOKEN", "PV_DIAL_RATE_PER_S"} <= names
    assert len(names) == len(Settings.model_fields)


def test_call_keys_share_one_hash_slot():
    cid = "abc-123"
    for key in keys.call_keys(cid):
        assert "{abc-123}" in key
    assert len(set(keys.call_keys(cid))) == len(keys.call_keys(cid))


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "a/b", "{x}", None,
                                 "abc\n"])  # "$" matched before a trailing newline
def test_call_ids_are_restricted(bad):
    with pytest.raises(ValueError, match="call_id"):
        keys.validate_call_id(bad)


@pytest.mark.parametrize("bad", ["http://gw.example.com", "gw.example.com:8765", "wss://"])
def test_gateway_public_url_must_be_ws_at_startup(bad):
    # Review fix: a wrong PV_GATEWAY_PUBLIC_URL was accepted and only failed at
    # the first dial (sign_stream_url), far from the configuration mistake.
    with pytest.raises(ValueError, match="PV_GATEWAY_PUBLIC_URL"):
        Settings.from_env({"PV_GATEWAY_PUBLIC_URL": bad})
    assert Settings.from_env({"PV_GATEWAY_PUBLIC_URL": "wss://gw.example.com/media"})
