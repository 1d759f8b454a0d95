from urllib.parse import urlsplit

import pytest

from piopiy_voice.signing import SignatureError, parse_call_path, sign_stream_url, verify_stream_path

SECRET = "s3cret-for-tests"
NOW = 1_800_000_000


def _path(url):
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_round_trip_carries_call_id_and_signed_params():
    url = sign_stream_url("wss://gw.example.com/media", "call-7", SECRET, now=NOW, ttl_s=60,
                          params={"rate": "16000", "mode": "both"})
    assert url.startswith("wss://gw.example.com/media/call/call-7?")
    target = verify_stream_path(_path(url), SECRET, now=NOW + 59)
    assert target.call_id == "call-7"
    assert target.params == {"rate": "16000", "mode": "both"}
    assert target.expires_at == NOW + 60


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.replace("call-7", "call-8"),
        lambda p: p.replace("rate=16000", "rate=8000"),
        lambda p: p.replace("sig=", "sig=0"),
        lambda p: p + "&flow=evil",
    ],
    ids=["call-id", "param", "sig", "added-param"],
)
def test_any_tampering_is_refused(mutate):
    url = sign_stream_url("ws://127.0.0.1:1", "call-7", SECRET, now=NOW, params={"rate": "16000"})
    with pytest.raises(SignatureError) as exc:
        verify_stream_path(mutate(_path(url)), SECRET, now=NOW)
    assert not exc.value.expired


def test_wrong_secret_is_refused():
    url = sign_stream_url("ws://127.0.0.1:1", "c", SECRET, now=NOW)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_stream_path(_path(url), "another-secret", now=NOW)


def test_expired_url_is_flagged_as_expired():
    url = sign_stream_url("ws://127.0.0.1:1", "c", SECRET, now=NOW, ttl_s=10)
    with pytest.raises(SignatureError) as exc:
        verify_stream_path(_path(url), SECRET, now=NOW + 11)
    assert exc.value.expired


@pytest.mark.parametrize("path", ["/call/c", "/call/c?exp=1", "/call/c?sig=ab", "/call/c?exp=x&sig=ab"])
def test_missing_or_malformed_signature_fields(path):
    with pytest.raises(SignatureError):
        verify_stream_path(path, SECRET, now=NOW)


def test_non_call_paths_are_value_errors_not_signature_errors():
    for path in ["/healthz", "/call/", "/call/a/b", "/"]:
        with pytest.raises(ValueError):
            verify_stream_path(path, SECRET)
    assert parse_call_path("/x/call/abc?q=1") == ("abc", {"q": "1"})


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(public_base="http://x", call_id="c"), "ws://"),
        (dict(public_base="ws://x", call_id="bad id/"), "call_id"),
        (dict(public_base="ws://x", call_id="c", ttl_s=0), "ttl_s"),
        (dict(public_base="ws://x", call_id="c", params={"sig": "1"}), "sig"),
    ],
)
def test_signing_rejects_bad_input(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        sign_stream_url(secret=SECRET, **kwargs)
    with pytest.raises(ValueError, match="secret"):
        sign_stream_url("ws://x", "c", "")


def test_signature_is_unambiguous_over_params():
    # Review fix: params were signed as "k=v&k=v" without escaping, so a signed
    # value containing "&"/"=" could be re-split into different params that
    # carried the same signature.
    url = sign_stream_url("ws://127.0.0.1:1", "call-7", SECRET, now=NOW,
                          params={"a": "1&b=2"})
    path = _path(url)
    assert "a=1%26b%3D2" in path
    assert verify_stream_path(path, SECRET, now=NOW).params == {"a": "1&b=2"}
    forged = path.replace("a=1%26b%3D2", "a=1&b=2")
    with pytest.raises(SignatureError):
        verify_stream_path(forged, SECRET, now=NOW)


@pytest.mark.parametrize("value", [None, True, 1.5, ["x"]])
def test_param_values_are_not_silently_stringified(value):
    # Review fix: str(None) == "None" was signed into the URL as a campaign name.
    with pytest.raises(ValueError, match="params.campaign"):
        sign_stream_url("ws://127.0.0.1:1", "call-7", SECRET, now=NOW,
                        params={"campaign": value})


def test_call_id_with_colon_round_trips():
    # Review fix: ":" is a valid call-id character but sign_stream_url
    # percent-encodes it and the path was not decoded, so the gateway answered
    # 401 to its own URL.
    url = sign_stream_url("ws://127.0.0.1:1", "camp:42", SECRET, now=NOW)
    assert verify_stream_path(_path(url), SECRET, now=NOW).call_id == "camp:42"
