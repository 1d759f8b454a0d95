"""docker-compose.yml, .env.example, Dockerfile, redis.conf, prometheus.yml stay true.

No Docker engine is needed: the compose file is validated by Debian's
``docker-compose config`` (apt-get install docker-compose) or ``docker compose
config``; every command is parsed by the role's own argparse; every variable is
checked against ``Settings.env_names()``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from piopiy_voice.cli import COMMANDS, resolve
from piopiy_voice.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
from piopiy_voice.compose import ComposeFile, variables_used

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROFILES = ("sandbox", "metrics")
#: Variables compose itself reads (image tag, published host ports); never
#: passed to a process. Documented in .env.example's "compose only" block.
COMPOSE_ONLY = {"PIOPIY_VOICE_IMAGE", "GATEWAY_HOST_PORT", "SANDBOX_HOST_PORT", "PROMETHEUS_HOST_PORT",
                "API_HOST_PORT", "GRAFANA_HOST_PORT", "HTTP_HOST_PORT", "HTTPS_HOST_PORT",
                "CADDY_DOMAIN", "CADDY_TLS", "SECRETS_DIR"}
#: Services that do not run piopiy-voice, and the image each must use.
THIRD_PARTY = {"redis": "redis:7.2", "prometheus": "prom/prometheus:", "caddy": "caddy:2.",
               "grafana": "grafana/grafana:", "redis-exporter": "oliver006/redis_exporter:"}
#: Third-party services without a shell (scratch image): no health check.
NO_HEALTHCHECK = {"redis-exporter"}


@pytest.fixture(scope="module")
def compose():
    return ComposeFile(COMPOSE, environ={})


def role_services(compose):
    return [n for n in compose.services if compose.role_argv(n) is not None]


def _validator():
    """argv prefix of an available compose validator, or None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def validator():
    cmd = _validator()
    if cmd is None:
        msg = ("no compose validator: install Debian's docker-compose "
               "(apt-get install -y docker-compose) or the docker compose plugin")
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " -- required in CI")
        pytest.skip(msg)
    return cmd


def run_validator(cmd, compose_file: Path, tmp_path: Path):
    # An empty env file: the check must not depend on a developer's .env.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    args = [*cmd, "--env-file", str(empty), "-f", str(compose_file), "--project-directory", str(ROOT)]
    for p in PROFILES:
        args += ["--profile", p]
    env = {k: v for k, v in os.environ.items() if k not in variables_used(COMPOSE.read_text())}
    return subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_compose_file_validates(validator, tmp_path):
    res = run_validator(validator, COMPOSE, tmp_path)
    assert res.returncode == 0, res.stderr


def test_validator_rejects_a_broken_file(validator, tmp_path):
    # Proves the validator above validates: an unknown service key must fail.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("  worker:\n", "  worker:\n    replicaz: 2\n", 1))
    res = run_validator(validator, broken, tmp_path)
    assert res.returncode != 0
    assert "replicaz" in res.stderr


def test_services_present(compose):
    assert set(compose.services) == {"redis", "gateway", "worker", "transcriber", "api", "dialer",
                                     "sandbox", "caddy", "prometheus", "grafana", "redis-exporter"}
    assert compose.service("sandbox").get("profiles") == ["sandbox"]
    for name in ("prometheus", "grafana", "redis-exporter"):
        assert compose.service(name).get("profiles") == ["metrics"], name
    for name in ("redis", "gateway", "worker", "transcriber", "api", "dialer", "caddy"):
        assert not compose.service(name).get("profiles"), f"{name} must run by default"


def test_only_known_third_party_services(compose):
    for name in compose.services:
        if compose.role_argv(name) is None:
            assert name in THIRD_PARTY, f"service {name}: command {compose.command(name)} is not piopiy-voice"
            assert compose.service(name)["image"].startswith(THIRD_PARTY[name])


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse_with_role_parser(role: str, args: list[str]):
    """Run the role's main() only as far as its argparse; return the Namespace."""
    main = resolve(role)
    original = argparse.ArgumentParser.parse_args

    def capture(self, args_=None, namespace=None):
        raise _Parsed(original(self, args_, namespace))

    argparse.ArgumentParser.parse_args = capture
    try:
        main(list(args))
    except _Parsed as parsed:
        return parsed.namespace
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{role}: main() returned without calling ArgumentParser.parse_args")


def role_help(role: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        resolve(role)(["--help"])
    assert exc.value.code in (0, None), f"{role} --help exited {exc.value.code}"
    return out.getvalue()


@pytest.mark.parametrize("service", ["gateway", "worker", "dialer", "sandbox"])
def test_command_is_a_real_entry_point(compose, service):
    argv = compose.role_argv(service)
    assert argv, f"{service}: no piopiy-voice role in command"
    role, args = argv[0], argv[1:]
    assert role in COMMANDS, f"{service}: unknown role {role!r}"
    assert role == service, f"service {service} runs role {role}"
    help_text = role_help(role)
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in help_text, f"{service}: {arg} not in `{role} --help`"
    parse_with_role_parser(role, args)  # argparse exits 2 on a wrong option/arity


def test_every_role_service_is_covered(compose):
    assert sorted(role_services(compose)) == ["api", "dialer", "gateway", "sandbox", "transcriber", "worker"]


def test_env_names_are_settings(compose):
    names = Settings.env_names()
    for service in compose.services:
        env = compose.environment(service)
        if compose.role_argv(service) is None:
            # A third-party service reads only compose-only variables (caddy's domain).
            assert set(env) <= COMPOSE_ONLY, f"{service}: sets {sorted(env)} but is not a piopiy-voice role"
            continue
        unknown = sorted(set(env) - names)
        assert not unknown, f"{service}: not read by Settings: {unknown}"
        # And the values (defaults) are valid settings (secret mounts read
        # from the files compose would mount).
        mounts = compose.secret_files(service)
        Settings.from_env({k: str(mounts.get(v, v)) for k, v in env.items()})


def test_interpolated_variables_are_known_and_documented():
    used = variables_used(COMPOSE.read_text())
    names = Settings.env_names()
    assert set(used) - names - COMPOSE_ONLY == set()
    documented = ComposeEnvExample.load()
    assert set(used) - set(documented) == set(), "undocumented in .env.example"
    for var, default in used.items():
        assert default is not None, f"${{{var}}} has no default"
        assert documented[var] == default, f"{var}: compose default {default!r} != .env.example {documented[var]!r}"


class ComposeEnvExample:
    @staticmethod
    def load() -> dict[str, str]:
        out = {}
        for line in ENV_EXAMPLE.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, sep, val = line.partition("=")
                assert sep, f".env.example: bad line {line!r}"
                out[key] = val
        return out


def test_env_example_names_are_real():
    keys = set(ComposeEnvExample.load())
    assert keys - Settings.env_names() - COMPOSE_ONLY == set()
    Settings.from_env({k: v for k, v in ComposeEnvExample.load().items() if k not in COMPOSE_ONLY})


def test_workers_can_scale(compose):
    worker = compose.service("worker")
    assert "container_name" not in worker
    assert "ports" not in worker, "host ports stop --scale worker=N"
    assert "hostname" not in worker
    assert "PV_WORKER_ID" not in compose.environment("worker")
    assert "PV_GATEWAY_ID" not in compose.environment("gateway")
    for svc in ("gateway", "dialer"):
        assert "container_name" not in compose.service(svc)


def _duration_s(text: str) -> float:
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(a + b for a, b in parts) == str(text), f"bad duration {text!r}"
    for num, unit in parts:
        total += float(num) * units[unit]
    return total


def test_gateway_grace_outlasts_drain(compose):
    drain = float(compose.environment("gateway")["PV_DRAIN_GRACE_S"])
    grace = _duration_s(compose.service("gateway")["stop_grace_period"])
    assert grace >= drain + 10, f"stop_grace_period {grace}s leaves < 10 s over PV_DRAIN_GRACE_S {drain}s"


def test_dialer_grace_outlasts_a_job(compose):
    """A warm shutdown waits for the job in hand; killed mid-request, its
    outcome is unknown and the person is not called."""
    from piopiy_voice.workers.dialer.api import JOB_TIMEOUT_S

    grace = _duration_s(compose.service("dialer")["stop_grace_period"])
    assert grace >= JOB_TIMEOUT_S + 5, f"dialer stop_grace_period {grace}s < job timeout {JOB_TIMEOUT_S}s"


def test_health_checks_and_dependencies(compose):
    for name in compose.services:
        svc = compose.service(name)
        if name not in NO_HEALTHCHECK:
            assert compose.healthcheck(name), f"{name}: no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}: {cond}"
            assert compose.healthcheck(dep), f"{name} waits for {dep}, which has no healthcheck"
    for name in role_services(compose):
        test = compose.healthcheck(name)
        assert test[:3] == ["CMD", "piopiy-voice", "healthcheck"]
        assert test[3] == name
        assert compose.service(name).get("init") is True, f"{name}: needs init for signals"


def test_worker_health_port_matches_metrics_port(compose):
    argv = compose.role_argv("worker")
    port = argv[argv.index("--metrics-port") + 1]
    test = compose.healthcheck("worker")
    assert test[test.index("--port") + 1] == port
    assert int(port) in compose.exposed_ports("worker")


def test_redis_config_fits_streams(compose):
    redis = compose.service("redis")
    mounted = [v for v in redis["volumes"] if v.startswith("./deploy/redis.conf:")]
    assert mounted, "redis.conf not mounted"
    conf_path = mounted[0].split(":")[1]
    assert conf_path in compose.command("redis")
    conf = {}
    for line in (ROOT / "deploy" / "redis.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, val = line.partition(" ")
            conf.setdefault(key, val)
    assert conf["maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"\d+(mb|gb)", conf["maxmemory"])
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "AOF directory is not on a volume"


def test_prometheus_scrapes_every_http_role(compose):
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {}
    for job in cfg["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                targets[name] = sd["port"]
    assert targets.get("gateway") == int(compose.environment("gateway")["PV_GATEWAY_PORT"])
    assert targets.get("api") == int(compose.environment("api")["PV_API_PORT"])
    for role in ("worker", "transcriber"):
        argv = compose.role_argv(role)
        assert targets.get(role) == int(argv[argv.index("--metrics-port") + 1]), role
    for name in targets:
        assert name in compose.services
    # The job names are the roles (the alerts and the dashboard select by job).
    assert {job["job_name"] for job in cfg["scrape_configs"]} == {"gateway", "worker", "transcriber", "api", "redis"}
    statics = [t for job in cfg["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert statics == [f"redis-exporter:{compose.exposed_ports('redis-exporter')[0]}"]


def test_deploy_doc_names_every_metric():
    from piopiy_voice.gateway import metrics as gw_metrics
    from piopiy_voice.workers import metrics as wk_metrics

    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    families = {spec.family for spec in gw_metrics.COUNTERS.values()}
    families |= {spec.family for spec in wk_metrics.COUNTER_SPECS.values()}
    for family in sorted(families):
        assert f"`{family}`" in doc, f"{family} not documented"
    gauges = re.findall(r'metrics\.gauge\("(\w+)"', (ROOT / "gateway" / "server.py").read_text())
    assert gauges
    for name in gauges:
        assert name in gw_metrics.GAUGE_HELP, f"gauge {name}: no HELP text in gateway/metrics.py"
        assert f"`pv_gateway_{name}`" in doc, f"gauge pv_gateway_{name} not documented"
    for name in ("calls_owned", "stream_lag_seconds", "loop_last_turn_seconds"):
        assert f"`pv_worker_{name}`" in doc, f"pv_worker_{name} not documented"
    for label in ('outcome="applied"', 'event="started"', 'kind="crash"', 'reason="gateway_lost"'):
        assert label in doc, f"label {label} not documented"


def test_volumes_of_role_services_are_writable_by_the_image_user(compose):
    # A named volume takes the ownership of the image directory it is mounted
    # on; a directory the image does not create would be root's.
    text = DOCKERFILE.read_text()
    for name in role_services(compose):
        for target in compose.volume_targets(name):
            assert re.search(rf"install -d -o piopiy -g piopiy .*{re.escape(target)}\b", text), (
                f"{name}: {target} is not created for the non-root user in the Dockerfile")


#: Settings the deployment fixes by layout (listen address, port, report
#: dir) or must leave to each replica's default (ids).
FIXED_BY_LAYOUT = {"PV_GATEWAY_HOST", "PV_GATEWAY_PORT", "PV_SANDBOX_HOST", "PV_SANDBOX_PORT",
                   "PV_SANDBOX_REPORT_DIR", "PV_API_HOST", "PV_API_PORT"}
PER_REPLICA = {"PV_GATEWAY_ID", "PV_WORKER_ID", "PV_TRANSCRIBER_ID"}


def secret_variables() -> dict[str, str]:
    """Every secret variable the project reads -> the variable naming its file."""
    from piopiy_voice.settings import SECRET_FILES, sections

    out = {Settings.model_fields[s].alias: Settings.model_fields[f].alias for s, f in SECRET_FILES.items()}
    for section in sections():
        out.update(section.secret_files())
    return out


def test_every_setting_is_deployable(compose):
    # A new field in shared/settings.py must be given to the roles (and
    # documented in .env.example) or be listed above with a reason. A secret
    # is given as its file (*_FILE), never as a value.
    names = Settings.env_names()
    documented = set(ComposeEnvExample.load())
    assert names - documented - FIXED_BY_LAYOUT - PER_REPLICA == set()
    set_somewhere = set().union(*(compose.environment(n) for n in role_services(compose)))
    by_file = {var for var, file_var in secret_variables().items() if file_var in set_somewhere}
    assert names - set_somewhere - by_file - PER_REPLICA == set()
    assert not (set_somewhere & PER_REPLICA)


#: Secrets each role must read (from a file) for the stack to work at all.
REQUIRED_SECRETS = {"gateway": {"PV_SIGNING_SECRET_FILE"}, "api": {"PV_SIGNING_SECRET_FILE"},
                    "dialer": {"PV_SIGNING_SECRET_FILE", "PIOPIY_APP_TOKEN_FILE"},
                    "sandbox": {"PIOPIY_APP_TOKEN_FILE"}}


def test_secrets_are_files_not_env_defaults(compose):
    secrets = secret_variables()
    assert {"PV_SIGNING_SECRET", "PIOPIY_APP_TOKEN", "PV_ANSWER_TOKEN", "PV_LLM_API_KEY"} <= set(secrets)
    raw = yaml.safe_load(COMPOSE.read_text())
    for name in role_services(compose):
        env = compose.environment(name)
        plain = set(env) & set(secrets)
        assert not plain, f"{name}: secret values in the environment: {sorted(plain)}"
        mounts = compose.secret_files(name)
        for var in set(env) & set(secrets.values()):
            value = env[var]
            if var in REQUIRED_SECRETS.get(name, ()):
                assert value in mounts, f"{name}: {var}={value!r} is not a secret it mounts"
            else:  # optional: off by default, and its mount is ready when switched on
                assert value == "", f"{name}: optional {var} must default to empty"
                assert f"/run/secrets/{var[:-len('_FILE')].lower()}" in mounts, f"{name}: {var} has no mount"
        for var in REQUIRED_SECRETS.get(name, ()):
            assert var in env, f"{name}: {var} not set"
        # The sources are files under SECRETS_DIR (default: the dev directory).
        for spec in raw["secrets"].values():
            assert spec["file"].startswith("${SECRETS_DIR:-./deploy/secrets/dev}/"), spec
    # The development files exist and are not empty, and the signing secret is
    # the development value every role warns about (never mistaken for a real one).
    from piopiy_voice.settings import DEV_SECRET

    for name, spec in compose.secrets.items():
        path = ROOT / spec["file"]
        assert path.is_file() and path.read_text().strip(), f"secret {name}: {path} missing or empty"
    assert (ROOT / compose.secrets["pv_signing_secret"]["file"]).read_text().strip() == DEV_SECRET


def test_secrets_dir_moves_every_secret(tmp_path):
    prod = ComposeFile(COMPOSE, environ={"SECRETS_DIR": str(tmp_path)})
    assert {Path(s["file"]).parent for s in prod.secrets.values()} == {tmp_path}


def test_dev_secrets_load_as_settings(compose, tmp_path):
    """The dialer's compose env, with the mounts resolved as the local runner
    does, is valid Settings whose secrets come from the dev files."""
    from piopiy_voice.compose import LocalStack

    stack = LocalStack(compose, "redis://127.0.0.1:1/0", base_env={}, work_dir=tmp_path)
    stack.plan({"dialer": 1, "gateway": 1})
    for svc in ("dialer", "gateway"):
        env = stack.replicas[svc][0].env
        s = Settings.from_env(env)
        assert s.using_dev_secret, "the dev signing secret must be recognised as such"
    assert Settings.from_env(stack.replicas["dialer"][0].env).piopiy_app_token == "sandbox-dev-token"
    stack.down()


def _memory_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG])", str(text))
    assert m, f"memory limit {text!r}: use e.g. 512M or 1G"
    return int(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def test_log_rotation_and_resource_limits_everywhere(compose):
    for name in compose.services:
        svc = compose.service(name)
        logging = svc.get("logging") or {}
        assert logging.get("driver") == "json-file", f"{name}: no json-file logging"
        opts = logging.get("options") or {}
        assert re.fullmatch(r"\d+[km]", opts.get("max-size", "")), f"{name}: max-size {opts.get('max-size')!r}"
        assert int(opts.get("max-file", 0)) >= 2, f"{name}: max-file"
        limits = ((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        assert 0 < float(limits.get("cpus", 0)) <= 2, f"{name}: cpus limit {limits.get('cpus')!r}"
        assert 32 << 20 <= _memory_bytes(limits.get("memory", "")) <= 4 << 30, f"{name}: memory limit"
    # Redis' container limit must leave room above its maxmemory (fork for
    # the AOF rewrite, client buffers): at least 25 % more.
    conf = (ROOT / "deploy" / "redis.conf").read_text()
    maxmemory = re.search(r"^maxmemory (\d+)(mb|gb)$", conf, re.M)
    max_bytes = int(maxmemory.group(1)) << (20 if maxmemory.group(2) == "mb" else 30)
    assert _memory_bytes(compose.service("redis")["deploy"]["resources"]["limits"]["memory"]) >= 1.25 * max_bytes
    # One decode at a time per transcriber (the GIL): more than a core is waste.
    assert float(compose.service("transcriber")["deploy"]["resources"]["limits"]["cpus"]) <= 1


def test_roles_run_hardened(compose):
    for name in role_services(compose):
        svc = compose.service(name)
        assert svc.get("read_only") is True, f"{name}: root filesystem not read-only"
        assert "/tmp" in (svc.get("tmpfs") or []), f"{name}: no writable /tmp"
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in (svc.get("security_opt") or []), name


def test_only_the_proxy_publishes_beyond_loopback(compose):
    for name in compose.services:
        for port in compose.service(name).get("ports") or []:
            if name == "caddy":
                continue
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"
    caddy = compose.service("caddy")
    assert [str(p).rsplit(":", 1)[-1] for p in caddy["ports"]] == ["80", "443"]
    assert "./deploy/Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]
    assert any(v.endswith(":/data") for v in caddy["volumes"]), "caddy's certificates and CA must persist"
    assert set(caddy["depends_on"]) == {"gateway", "api"}
