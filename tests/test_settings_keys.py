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
    assert len(Settings.own_env_names()) == len(Settings.model_fields)
    # Every section's variables too, each declared once (no name in two places).
    from piopiy_voice.settings import sections

    declared = [f.alias for f in Settings.model_fields.values()]
    for section in sections():
        declared += [f.alias for f in section.model_fields.values()] + list(section.secret_files().values())
    assert len(declared) == len(set(declared)) == len(names)


AREA_VARIABLES = ["PV_VAD", "PV_ASR", "PV_ASR_MODE", "PV_ASR_CORPUS", "PV_DEEPGRAM_API_KEY", "PV_TTS",
                  "PV_TTS_TIMEOUT_S", "PV_TURN_ONSET_MS", "PV_ASR_PREROLL_MS", "PV_ASR_TAIL_MS",
                  "PV_ASR_SECOND_PASS", "PV_TRANSCRIBER_LEASE_MS",
                  "PV_TRANSCRIBER_ID", "PV_TRANSCRIPT_WAIT_MS", "PV_AGENT_MAX_FAILURES",
                  "PV_HISTORY_MAX_MESSAGES", "PV_SYSTEM_PROMPT", "PV_LLM_BASE_URL", "PV_LLM_FIRST_TOKEN_S",
                  "PV_API_PORT", "PV_SUPERVISOR_NUMBER", "PV_ANSWER_TOKEN", "PV_ANSWER_ALLOW_IPS"]


@pytest.mark.parametrize("name", AREA_VARIABLES)
def test_area_variables_are_known_not_reported(name, caplog):
    assert name in Settings.env_names()
    with caplog.at_level(logging.WARNING):
        Settings.from_env({name: ""})  # seen (checked for typos), empty = default
    assert "unknown" not in caplog.text


def test_sections_read_env_then_dotenv(tmp_path, monkeypatch):
    from piopiy_voice.api.config import ApiSettings
    from piopiy_voice.speech.config import SpeechConfig
    from piopiy_voice.speech.llm import LlmConfig

    (tmp_path / ".env").write_text("PV_VAD=webrtc\nPV_LLM_MODEL=from-dotenv\nPV_API_PORT=9100\n"
                                   "PV_TURN_ONSET_MS=120\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PV_TURN_ONSET_MS", "160")  # the environment wins over .env
    monkeypatch.delenv("PV_VAD", raising=False)
    assert SpeechConfig.from_env().vad == "webrtc"
    assert SpeechConfig.from_env().turn_onset_ms == 160
    assert LlmConfig.from_env().model == "from-dotenv"
    assert ApiSettings.from_env().port == 9100


def test_section_secrets_from_files(tmp_path):
    from piopiy_voice.api.config import ApiSettings
    from piopiy_voice.errors import PiopiyConfigError
    from piopiy_voice.speech.config import SpeechConfig
    from piopiy_voice.speech.llm import LlmConfig

    secret = tmp_path / "s"
    secret.write_text("  s3cret\n")
    assert LlmConfig.from_env({"PV_LLM_API_KEY_FILE": str(secret)}).api_key == "s3cret"
    assert SpeechConfig.from_env({"PV_TTS_API_KEY_FILE": str(secret)}).tts_api_key == "s3cret"
    assert ApiSettings.from_env({"PV_ANSWER_TOKEN_FILE": str(secret)}).answer_token == "s3cret"
    with pytest.raises(PiopiyConfigError, match="PV_ANSWER_TOKEN and PV_ANSWER_TOKEN_FILE"):
        ApiSettings.from_env({"PV_ANSWER_TOKEN": "a", "PV_ANSWER_TOKEN_FILE": str(secret)})
    with pytest.raises(PiopiyConfigError, match="PV_DEEPGRAM_API_KEY_FILE"):
        SpeechConfig.from_env({"PV_DEEPGRAM_API_KEY_FILE": str(tmp_path / "missing")})
    assert "s3cret" not in repr(LlmConfig.from_env({"PV_LLM_API_KEY_FILE": str(secret)}))


@pytest.mark.parametrize("env, name", [
    ({"PV_TRANSCRIPT_WAIT_MS": "soon"}, "PV_TRANSCRIPT_WAIT_MS"),
    ({"PV_AGENT_MAX_FAILURES": "0"}, "PV_AGENT_MAX_FAILURES"),
    ({"PV_ASR_MODE": "poetry"}, "PV_ASR_MODE"),
    ({"PV_TRANSCRIBER_LEASE_MS": "50"}, "PV_TRANSCRIBER_LEASE_MS"),
    ({"PV_LLM_TEMPERATURE": "3"}, "PV_LLM_TEMPERATURE"),
    ({"PV_API_PORT": "http"}, "PV_API_PORT"),
])
def test_bad_area_values_are_config_errors_naming_the_variable(env, name):
    from piopiy_voice.errors import PiopiyConfigError
    from piopiy_voice.workers.agent.conversation import AgentConfig

    from piopiy_voice.api.config import ApiSettings

    with pytest.raises(PiopiyConfigError, match=name):
        (ApiSettings if name.startswith("PV_API") else AgentConfig).from_env(env)


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
