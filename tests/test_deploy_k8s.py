"""deploy/k8s (kustomize base) stays as true as docker-compose.yml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from piopiy_voice.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
from piopiy_voice.compose import ComposeFile

ROLES = ("gateway", "worker", "transcriber", "api", "dialer")
SECRET = "piopiy-voice-secrets"
CONFIGMAP = "piopiy-voice-config"


@pytest.fixture(scope="module")
def docs():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = []
    for res in kust["resources"]:
        out += [d for d in yaml.safe_load_all((K8S / res).read_text()) if d]
    return out


@pytest.fixture(scope="module")
def compose():
    return ComposeFile(ROOT / "docker-compose.yml", environ={})


def find(docs, kind, name):
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def container(docs, role):
    dep = find(docs, "Deployment", role)
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    return pod["spec"], c


def test_every_resource_file_parses_and_is_listed(docs):
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name")


def test_configmap_is_settings_with_env_example_defaults(docs):
    data = find(docs, "ConfigMap", CONFIGMAP)["data"]
    assert set(data) <= Settings.env_names()
    example = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            example[k] = v
    for k, v in data.items():
        assert isinstance(v, str), f"{k}: ConfigMap values must be strings"
        assert example.get(k) == v, f"{k}: k8s {v!r} != .env.example {example.get(k)!r}"
    for secret in ("PV_SIGNING_SECRET", "PIOPIY_APP_TOKEN"):
        assert secret not in data, f"{secret} belongs in the Secret"
    Settings.from_env(data)


@pytest.mark.parametrize("role", ROLES)
def test_same_command_and_env_as_compose(docs, compose, role):
    _, c = container(docs, role)
    assert c["command"] == compose.command(role)
    assert c["image"] == "piopiy-voice"
    assert [r["configMapRef"]["name"] for r in c.get("envFrom", [])] == [CONFIGMAP]
    configmap = find(docs, "ConfigMap", CONFIGMAP)["data"]
    env = {e["name"]: e for e in c.get("env", [])}
    assert set(env) <= Settings.env_names()
    names = set(env) | set(configmap)
    missing = set(compose.environment(role)) - names
    assert not missing, f"{role}: compose sets {sorted(missing)}, k8s does not"
    for name, e in env.items():
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref == {"name": SECRET, "key": name}
            assert name in compose.environment(role), f"{role}: secret {name} not given in compose"
        else:
            assert e["value"] == compose.environment(role)[name], f"{role}: {name}"
    # A secret compose hands this role must come from the Secret here.
    for secret in ("PV_SIGNING_SECRET", "PIOPIY_APP_TOKEN"):
        assert (secret in compose.environment(role)) == ("valueFrom" in env.get(secret, {}))


def test_gateway_probes_service_and_grace(docs, compose):
    pod, c = container(docs, "gateway")
    port = int(compose.environment("gateway")["PV_GATEWAY_PORT"])
    (p,) = c["ports"]
    assert p["containerPort"] == port
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["port"] == p["name"]
    drain = float(find(docs, "ConfigMap", CONFIGMAP)["data"]["PV_DRAIN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 10
    svc = find(docs, "Service", "gateway")
    assert svc["spec"]["selector"] == find(docs, "Deployment", "gateway")["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == port


@pytest.mark.parametrize("role", ROLES)
def test_grace_period_matches_compose(docs, compose, role):
    from test_deploy_compose import _duration_s  # tests/ is on the path (rootdir conftest)

    pod, _ = container(docs, role)
    assert pod["terminationGracePeriodSeconds"] == _duration_s(compose.service(role)["stop_grace_period"])


@pytest.mark.parametrize("role", ["worker", "dialer"])
def test_exec_probes_match_compose_healthchecks(docs, compose, role):
    _, c = container(docs, role)
    assert ["CMD", *c["livenessProbe"]["exec"]["command"]] == compose.healthcheck(role)


def test_worker_scales(docs):
    pod, c = container(docs, "worker")
    env = {e["name"] for e in c.get("env", [])}
    assert "PV_WORKER_ID" not in env
    hpa = find(docs, "HorizontalPodAutoscaler", "worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("role", ROLES)
def test_non_root(docs, role):
    pod, c = container(docs, role)
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = re.findall(r"^USER\s+(\d+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.M)[-1]
    assert pod["securityContext"]["runAsUser"] == int(user)  # the image's user
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
