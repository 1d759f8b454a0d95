"""The shipped dashboard and alert rules are valid and name only real metrics.

- ``promtool check rules`` / ``check config`` / ``test rules`` (Debian's
  ``prometheus`` package ships /usr/bin/promtool) validate deploy/prometheus.yml,
  deploy/prometheus/alerts.yml and its unit tests (alerts_test.yml: series in,
  alerts out). Skipped only when promtool is absent and CI is not set.
- Every metric a dashboard query or an alert expression names is one our roles
  export: each role's metrics object (the code that serves its /metrics) is
  rendered here and parsed, so a renamed or removed metric fails this test;
  the only others allowed are Prometheus' ``up`` and the few redis_exporter
  names listed below. Label matchers must name label values the role emits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "piopiy-voice.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
#: redis_exporter (oliver006/redis_exporter, the compose `redis-exporter`
#: service) metric names the dashboard and alerts use.
REDIS_EXPORTER = {"redis_up", "redis_memory_used_bytes", "redis_memory_max_bytes", "redis_connected_clients",
                  "redis_commands_processed_total"}
PROMETHEUS_SYNTHETIC = {"up"}
METRIC = re.compile(r"\b((?:pv|process|redis)_[a-z0-9_]+|up)\b(\{[^}]*\})?")


def _render_roles() -> str:
    """The /metrics text of every role, from the objects that serve it."""
    from prometheus_client import REGISTRY, generate_latest

    import piopiy_voice.api.metrics  # noqa: F401  (registers pv_api_* in the default registry)
    from piopiy_voice.gateway.metrics import Metrics as GatewayMetrics
    from piopiy_voice.speech.transcriber_metrics import TranscriberMetrics
    from piopiy_voice.workers.metrics import Metrics as WorkerMetrics

    gateway = GatewayMetrics()
    # The gauges gateway/server.py registers at start (same names, any value).
    for name in re.findall(r'metrics\.gauge\("(\w+)"', (ROOT / "gateway" / "server.py").read_text()):
        gateway.gauge(name, lambda: 0.0)
    worker, transcriber = WorkerMetrics(), TranscriberMetrics()
    worker.calls_owned = 0  # a loop turn: the loop_last_turn gauges appear
    transcriber.calls_owned = 0
    worker.observe_lag(0.01)
    return "\n".join([gateway.render(), worker.render(), transcriber.render().decode(),
                      generate_latest(REGISTRY).decode()])


@pytest.fixture(scope="module")
def exported() -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets of its samples (empty list: declared, no sample yet)."""
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(_render_roles()):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["_sum", "_count", ""]}.get(family.type, [""])
        for s in suffixes:
            out.setdefault(family.name + s, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def test_roles_export_what_the_docs_promise(exported):
    # Guards the fixture itself: each role's families are really there.
    for name in ("pv_gateway_audio_frames_dropped_total", "pv_gateway_calls_live", "pv_worker_stream_lag_seconds_bucket",
                 "pv_worker_leases_lost_total", "pv_transcriber_decode_cpu_seconds_total", "pv_api_listeners",
                 "process_cpu_seconds_total"):
        assert name in exported, name
    assert "pv_nonexistent_total" not in exported


def check_expr(expr: str, exported, where: str) -> set[str]:
    names = set()
    for m in METRIC.finditer(expr):
        name, matchers = m.group(1), m.group(2) or ""
        if name in REDIS_EXPORTER | PROMETHEUS_SYNTHETIC:
            names.add(name)
            continue
        assert name in exported, f"{where}: {name} is not exported by any role ({expr})"
        names.add(name)
        samples = exported[name]
        for label, op, value in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', matchers):
            if op != "=" or label == "job" or not samples:
                continue
            seen = {s.get(label) for s in samples}
            assert value in seen, f"{where}: {name}{{{label}=\"{value}\"}}: the role emits {sorted(map(str, seen))}"
    return names


def dashboard_targets():
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_is_valid_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "piopiy-voice" and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] in ("row", "text"):
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_dashboard_queries_name_exported_metrics(exported):
    used = set()
    for panel, target in dashboard_targets():
        used |= check_expr(target["expr"], exported, f"panel {panel['title']!r}")
    # What the dashboard is for: every area has its panels.
    for name in ("pv_gateway_calls_live", "pv_gateway_audio_frames_received_total",
                 "pv_gateway_messages_sent_total", "pv_gateway_audio_frames_dropped_total",
                 "pv_worker_stream_lag_seconds_bucket", "pv_gateway_commands_total",
                 "pv_worker_leases_lost_total", "pv_worker_takeovers_total", "pv_transcriber_segments_total",
                 "pv_transcriber_decode_cpu_seconds_total", "pv_api_listeners", "pv_api_auth_refusals_total",
                 "pv_gateway_handshakes_refused_total", "redis_memory_used_bytes", "redis_memory_max_bytes"):
        assert name in used, f"the dashboard does not show {name}"


def load_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_alert_rules_name_exported_metrics(exported):
    used = {}
    for rule in load_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        for name in check_expr(rule["expr"], exported, f"alert {rule['alert']}"):
            used.setdefault(name, []).append(rule["alert"])
    for name in ("pv_gateway_audio_frames_dropped_total", "pv_worker_stream_lag_seconds_bucket",
                 "pv_worker_leases_lost_total", "pv_transcriber_commits_refused_total",
                 "pv_gateway_handshakes_refused_total", "redis_memory_used_bytes", "up"):
        assert name in used, f"no alert on {name}"
    down = {r["labels"].get("role") for r in load_rules() if r["expr"].startswith("absent(up{")}
    assert down >= {"gateway", "worker", "transcriber", "api"}, "a role-down alert is missing"


def _promtool():
    tool = shutil.which("promtool")
    if tool is None:
        msg = "promtool not installed (Debian: apt-get install -y prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " -- required in CI")
        pytest.skip(msg)
    return tool


def test_promtool_checks_rules_config_and_rule_unit_tests():
    tool = _promtool()
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(DEPLOY / "prometheus.yml")],
                 ["test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")]):
        res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}\n{res.stderr}"


def test_promtool_rejects_a_broken_rule(tmp_path):
    # Proves the check above checks: an invalid PromQL expression must fail.
    tool = _promtool()
    broken = tmp_path / "alerts.yml"
    broken.write_text(ALERTS.read_text().replace("> 0.2", "> > 0.2", 1))
    res = subprocess.run([tool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0


def test_prometheus_loads_the_rules_where_compose_mounts_them():
    from piopiy_voice.compose import ComposeFile

    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (rule_file,) = cfg["rule_files"]
    assert (DEPLOY / rule_file).resolve() == ALERTS.resolve()  # relative to prometheus.yml
    prom = ComposeFile(ROOT / "docker-compose.yml", environ={}).service("prometheus")
    mounts = dict(v.split(":")[:2] for v in prom["volumes"])
    config_in = mounts["./deploy/prometheus.yml"]
    assert f"--config.file={config_in}" in prom["command"]
    assert str(Path(config_in).parent / rule_file) == str(Path(mounts["./deploy/prometheus"]) / ALERTS.name)


def test_grafana_is_provisioned_with_the_dashboard():
    from piopiy_voice.compose import ComposeFile

    compose = ComposeFile(ROOT / "docker-compose.yml", environ={})
    grafana = compose.service("grafana")
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/piopiy-voice.yml").read_text())
    (prov,) = provider["providers"]
    assert Path(mounts["./deploy/grafana/piopiy-voice.json"]).parent == Path(prov["options"]["path"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (ds,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == f"http://prometheus:{compose.exposed_ports('prometheus')[0]}"
    ini = (DEPLOY / "grafana" / "grafana.ini").read_text()
    password = re.search(r"^admin_password = \$__file\{(.+)\}$", ini, re.M).group(1)
    assert password in compose.secret_files("grafana"), "the admin password is not the mounted secret"
    assert set(grafana["depends_on"]) == {"prometheus"}
