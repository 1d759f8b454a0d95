"""Bad input at the borders: one PiopiyError naming the field, never a bare
RecursionError, OverflowError or a pydantic dump (issue 10, fuzzing finds)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from piopiy_voice import contracts as c
from piopiy_voice.errors import (
    MAX_JSON_DEPTH,
    PiopiyConfigError,
    PiopiyError,
    PiopiyProtocolError,
    PiopiyValidationError,
    from_pydantic,
    json_depth,
    load_json,
)
from piopiy_voice.gateway import control, outbound
from piopiy_voice.pcmo_models import BRIDGE_DEFAULTS, BRIDGE_LIMITS, Bridge, parse_pcmo, parse_ws_message
from piopiy_voice.workers.dialer import cli as dialer_cli
from piopiy_voice.workers.dialer.api import build_request

DEEP = "[" * 100_000 + "]" * 100_000


def test_error_areas_share_one_root():
    for cls in (PiopiyValidationError, PiopiyConfigError, PiopiyProtocolError):
        assert issubclass(cls, PiopiyError) and issubclass(cls, ValueError)


def test_json_depth_skips_strings():
    assert json_depth('{"a": [1, {"b": "[[[[{{"}]}') == 3
    assert json_depth(r'["\"[[[", []]') == 2
    assert json_depth("42") == 0


def test_load_json_bounds_depth_before_parsing():
    assert load_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x")
    with pytest.raises(PiopiyValidationError, match=r"^pcmo: nests deeper than 32 levels$"):
        load_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "pcmo")
    with pytest.raises(PiopiyValidationError, match="nests deeper"):
        load_json(DEEP, "pcmo")
    with pytest.raises(PiopiyValidationError, match="not valid JSON"):
        load_json("{", "pcmo")


@pytest.mark.parametrize("parse", [parse_pcmo, parse_ws_message])
def test_pcmo_parsers_refuse_deep_json(parse):
    with pytest.raises(PiopiyValidationError) as e:
        parse(DEEP)
    assert "nests deeper" in str(e.value)


def test_from_pydantic_is_one_line_naming_the_field():
    class M(BaseModel):
        n: int
        items: list[int]

    with pytest.raises(ValidationError) as e:
        M.model_validate({"n": "x", "items": [1, "y"]})
    err = from_pydantic(e.value, "body")
    assert err.field == "body.n"
    assert "\n" not in str(err) and "more problem" in str(err)


def test_control_cli_deep_pcmo_and_bad_model_values(monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never reached: input fails first
    assert control.main(["call-1", "pcmo", DEEP]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pcmo: nests deeper" in err
    assert control.main(["call-1", "pcmo", '"not a list"']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pcmo" in err and "validation error" not in err
    assert control.main(["call-1", "transfer", "919000000001", "--caller-id", "918000000000",
                         "--ring-type", "ring-all"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ring_type" in err


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300", "-1"])
def test_call_cli_in_must_be_a_finite_delay(value, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("PIOPIY_CALLER_ID", "919000000000")
    assert dialer_cli.call_main(["--to", "919812345678", f"--in={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--in: must be a number of seconds" in err


def test_call_cli_then_json_is_depth_bounded(monkeypatch, capsys):
    monkeypatch.setenv("PIOPIY_CALLER_ID", "919000000000")
    assert dialer_cli.call_main(["--to", "919812345678", "--then", DEEP]) == 2
    assert "--then: nests deeper" in capsys.readouterr().err


@pytest.mark.parametrize("main", [dialer_cli.call_main, dialer_cli.worker_main])
def test_dialer_commands_need_redis_url(main, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PIOPIY_CALLER_ID", "919000000000")
    argv = ["--to", "919812345678"] if main is dialer_cli.call_main else []
    assert main(argv) == 2
    assert "REDIS_URL is not set" in capsys.readouterr().err


# -- bridge options: one model, boundary values ---------------------------------

def _limits():
    for name, (low, high) in BRIDGE_LIMITS.items():
        yield name, low
        yield name, high


@pytest.mark.parametrize("name,value", list(_limits()))
def test_a_transfer_valid_at_the_worker_is_sent_by_the_gateway(name, value):
    t = c.Transfer(call_id="a", to=["919000000001"], caller_id="918000000000", ring_type="group",
                   **{name: value})
    t = c.decode(c.encode(t))  # as the gateway reads it from Redis
    msg = outbound.bridge(t.to, t.caller_id, duration=t.duration, timeout=t.timeout, loop=t.loop,
                          ring_type=t.ring_type)
    (action,) = parse_pcmo(msg)
    assert getattr(action, name) == value
    # The dialer's call request takes the same limits.
    req = build_request(None, to="919812345678", caller_id="919000000000", extra_actions=[
        {"action": "bridge", "from": 919000000000, "connect": [{"type": "pstn", "number": 919000000001}]}],
        **({name: value}))
    assert getattr(req, name) == value


@pytest.mark.parametrize("name,value", [(n, lo - 1) for n, (lo, _) in BRIDGE_LIMITS.items()]
                         + [(n, hi + 1) for n, (_, hi) in BRIDGE_LIMITS.items()])
def test_a_transfer_out_of_limits_is_refused_at_the_worker(name, value):
    with pytest.raises(ValidationError):
        c.Transfer(call_id="a", to=["919000000001"], caller_id="918000000000", **{name: value})
    with pytest.raises(PiopiyValidationError):
        outbound.bridge(["919000000001"], "918000000000", **{name: value})


def test_bridge_defaults_have_one_source():
    t = c.Transfer(call_id="a", to=["919000000001"], caller_id="918000000000")
    b = Bridge.model_validate({"from": 918000000000, "connect": [{"type": "pstn", "number": 919000000001}]})
    assert (t.duration, t.timeout, t.loop) == (b.duration, b.timeout, b.loop) == tuple(BRIDGE_DEFAULTS.values())
    with pytest.raises(ValidationError):
        c.Transfer(call_id="a", to=["919000000001"], caller_id="918000000000", ring_type="ring-all")


def test_stream_rates_have_one_source():
    from piopiy_voice.audio.pcm import SUPPORTED_RATES
    from piopiy_voice.pcmo_models import VOICE_QUALITIES

    assert c.VOICE_RATES is SUPPORTED_RATES and VOICE_QUALITIES is SUPPORTED_RATES
