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


#: Documentation only, never applied by the kustomization.
NOT_APPLIED = {"secret.example.yaml"}


def test_every_resource_file_parses_and_is_listed(docs):
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - NOT_APPLIED
    assert not any(d["kind"] == "Secret" for d in docs), "the Secret must not be applied by the base"
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
    from test_deploy_compose import secret_variables

    for secret in secret_variables():
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
        assert "valueFrom" not in e, f"{role}: {name}: secrets are files here as in compose"
        assert e["value"] == compose.environment(role)[name], f"{role}: {name}"


def secret_items(pod) -> dict[str, tuple[str, bool]]:
    """/run/secrets/<path> -> (Secret key, optional) of the pod's secret volume."""
    out = {}
    for vol in pod.get("volumes", []):
        for source in (vol.get("projected") or {}).get("sources", []):
            sec = source.get("secret")
            if sec:
                assert sec["name"] == SECRET
                for item in sec["items"]:
                    out[f"/run/secrets/{item['path']}"] = (item["key"], bool(sec.get("optional")))
    return out


@pytest.mark.parametrize("role", ROLES)
def test_secrets_are_the_files_compose_mounts(docs, compose, role):
    pod, c = container(docs, role)
    items = secret_items(pod)
    # Same mount points as compose's secrets, from the documented Secret's keys.
    assert set(items) == set(compose.secret_files(role)), role
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    for mount, (key, optional) in items.items():
        assert key in example["stringData"], f"{role}: key {key} not documented in secret.example.yaml"
        assert mount == f"/run/secrets/{key.lower()}"
        # Required secrets are those compose's role names in a *_FILE by default.
        required = mount in compose.environment(role).values()
        assert optional is not required, f"{role}: {key} optional={optional}"
    if items:
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/run/secrets"]["readOnly"] is True


def test_secret_example_documents_every_secret():
    from test_deploy_compose import secret_variables

    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert example["kind"] == "Secret" and example["metadata"]["name"] == SECRET
    assert set(example["stringData"]) == set(secret_variables())
    assert all("CHANGE-ME" in v for v in example["stringData"].values()), "no real-looking values in the example"


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


@pytest.mark.parametrize("role", ROLES)
def test_restricted_security_context(docs, role):
    """The Pod Security Standard "restricted" profile, and a read-only root."""
    pod, c = container(docs, role)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert not sc.get("privileged")
    # The one writable path (the transcriber's language model, temp files).
    vols = {v["name"]: v for v in pod["volumes"]}
    tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in vols[tmp[0]["name"]]


@pytest.mark.parametrize("role", ROLES)
def test_disruption_budget_per_role(docs, role):
    pdb = find(docs, "PodDisruptionBudget", role)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == find(docs, "Deployment", role)["spec"]["selector"]["matchLabels"]
    # One at a time, and never minAvailable (a single replica would block every drain).
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
    if role == "gateway":
        assert find(docs, "Deployment", "gateway")["spec"]["replicas"] >= 2, "a drained lone gateway stops new calls"


def test_ingress_routes_calls_to_the_gateway_and_the_rest_to_the_api(docs, compose):
    ing = find(docs, "Ingress", "piopiy-voice")
    assert ing["apiVersion"] == "networking.k8s.io/v1"
    ann = ing["metadata"]["annotations"]
    drain = float(find(docs, "ConfigMap", CONFIGMAP)["data"]["PV_MAX_CALL_S"])
    for key in ("nginx.ingress.kubernetes.io/proxy-read-timeout", "nginx.ingress.kubernetes.io/proxy-send-timeout"):
        assert int(ann[key]) >= drain, f"{key}: a silent call socket would be cut before PV_MAX_CALL_S"
    (rule,) = ing["spec"]["rules"]
    assert ing["spec"]["tls"][0]["hosts"] == [rule["host"]]
    routes = {(p["path"], p["pathType"]): (p["backend"]["service"]["name"], p["backend"]["service"]["port"]["number"])
              for p in rule["http"]["paths"]}
    gw_port = find(docs, "Service", "gateway")["spec"]["ports"][0]["port"]
    api_port = find(docs, "Service", "api")["spec"]["ports"][0]["port"]
    assert routes[("/call", "Prefix")] == ("gateway", gw_port)
    from piopiy_voice.signing import CALL_PATH_PREFIX

    assert CALL_PATH_PREFIX == "/call/"
    for path in ("/calls", "/console", "/answer", "/"):
        assert any(p == path and svc == ("api", api_port) for (p, _), svc in routes.items()), path
    # Metrics and health stay inside the cluster.
    assert not any(p in ("/metrics", "/healthz", "/readyz") or p.startswith("/metrics") for p, _ in routes)
    assert ("/", "Exact") in routes and ("/", "Prefix") not in routes
