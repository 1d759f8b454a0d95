"""The transcriber role's process shell: REDIS_URL required, /metrics + /healthz,
``piopiy-voice healthcheck transcriber``; the API role's REDIS_URL check."""

import socket
import time
import urllib.error
import urllib.request

import pytest

from piopiy_voice import contracts as c
from piopiy_voice import healthcheck as hc
from piopiy_voice import keys
from piopiy_voice.speech import transcriber_metrics as tm


@pytest.mark.parametrize("role", ["transcriber", "api"])
def test_production_roles_exit_2_without_redis_url(role, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # no developer .env
    monkeypatch.delenv("REDIS_URL", raising=False)
    if role == "transcriber":
        from piopiy_voice.speech.transcriber_role import main
    else:
        from piopiy_voice.api.server import main
    assert main([]) == 2
    assert "REDIS_URL is not set" in capsys.readouterr().err


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_health_endpoint():
    m = tm.TranscriberMetrics()
    server = tm.serve(m, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert _get(base + "/healthz")[0] == 503  # loop not started
        m.calls_owned = 3
        m.count([c.Transcript(call_id="a", seq=0, segment=0, text="he", final=False),
                 c.Transcript(call_id="a", seq=0, segment=0, text="hello", final=True)])
        m.counters["segments_total"] += 1
        m.counters["decode_cpu_seconds_total"] += 0.25
        code, body = _get(base + "/healthz")
        assert code == 200 and "turned" in body
        code, text = _get(base + "/metrics")
        assert code == 200
        assert "pv_transcriber_calls_owned 3.0" in text
        assert 'pv_transcriber_transcripts_total{kind="partial"} 1.0' in text
        assert 'pv_transcriber_transcripts_total{kind="final"} 1.0' in text
        assert "pv_transcriber_segments_total 1.0" in text
        assert "pv_transcriber_decode_cpu_seconds_total 0.25" in text
        assert "process_cpu_seconds_total" in text
        assert _get(base + "/nope")[0] == 404
    finally:
        server.shutdown()
    assert not m.healthy(now=time.monotonic() + tm.HEALTHY_TURN_S + 1)[0]


def test_healthcheck_transcriber(r, redis_url, monkeypatch):
    m = tm.TranscriberMetrics()
    m.calls_owned = 0
    server = tm.serve(m, "127.0.0.1", 0)
    port = server.server_port
    try:
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.delenv("PV_TRANSCRIBER_ID", raising=False)
        ok, why = hc.check("transcriber", [])
        assert not ok and "--metrics-port" in why
        ok, why = hc.check("transcriber", ["--metrics-port", str(port)])
        assert not ok and "no transcriber heartbeat" in why
        r.zadd(keys.TRANSCRIBERS_ZSET, {f"asr-{socket.gethostname()}-77": time.time()})
        ok, why = hc.check("transcriber", [], port=port)
        assert ok, why
        assert hc.main(["transcriber", "--port", str(port)]) == 0
    finally:
        server.shutdown()
