"""The wheel installs one import name, ``piopiy_voice``, and nothing else.

A user's project commonly has its own ``shared/`` or ``workers/`` package; before
the namespace renovation ours shadowed theirs (``from shared import RestClient``
failed, an agent in ``workers.mytools`` could not be loaded). This test builds
the real wheel from a copy of the tracked sources, installs it into a fresh
virtual environment (dependencies borrowed from the test venv through a ``.pth``
line, so nothing is downloaded), and runs a user project beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if not src.is_file():
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read_bytes())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the sources")
    src = tmp_path_factory.mktemp("src")
    _tracked_copy(src)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(src)], check=True,
                   capture_output=True, text=True)
    (whl,) = dist.glob("piopiy_voice-*.whl")
    return whl


def test_wheel_has_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert tops == {"piopiy_voice"}, tops
    # the data files ride along under the new names
    assert "piopiy_voice/workers/media/greeting.wav" in names
    assert any(n.startswith("piopiy_voice/sandbox/scenarios/") and n.endswith(".json") for n in names)


def test_user_project_with_shared_and_workers_packages(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies come from the test venv; our own package only from the wheel
    # (the test venv's editable install is a finder that a plain path line does not load).
    Path(site, "deps_from_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True, capture_output=True, text=True)

    project = tmp_path / "userproj"
    (project / "shared").mkdir(parents=True)
    (project / "shared" / "__init__.py").write_text("WHO = 'user shared'\n")
    (project / "workers").mkdir()
    (project / "workers" / "__init__.py").write_text("")
    (project / "workers" / "mytools.py").write_text(textwrap.dedent("""
        from piopiy_voice.contracts import AudioFrame, Speak
        from piopiy_voice.workers.agent.base import Agent

        class Parrot(Agent):
            def on_event(self, event, now):
                return [self.command(Speak, text="hello")] if isinstance(event, AudioFrame) else []
    """))
    probe = textwrap.dedent("""
        import json, sys
        import shared, workers
        import piopiy_voice
        from piopiy_voice import Action, RestClient, StreamAction
        from piopiy_voice.workers.agent.base import load_agent_class
        cls = load_agent_class("workers.mytools:Parrot")
        print(json.dumps({
            "shared": shared.WHO,
            "workers": workers.__file__,
            "ours": piopiy_voice.__file__,
            "agent": cls.__module__ + ":" + cls.__name__,
            "rest": RestClient.__module__,
        }))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(py), "-c", probe], cwd=project, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shared"] == "user shared"
    assert Path(got["workers"]).resolve() == (project / "workers" / "__init__.py").resolve()
    assert Path(got["ours"]).resolve().is_relative_to(Path(site).resolve())
    assert got["agent"] == "workers.mytools:Parrot"
    assert got["rest"] == "piopiy_voice.rest"

    # The console script of the wheel runs and knows its roles.
    cli = subprocess.run([str(env_dir / "bin" / "piopiy-voice"), "--help"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "worker" in cli.stdout and "gateway" in cli.stdout
