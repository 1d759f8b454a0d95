"""Another git revision of this project as an importable ``piopiy_voice`` directory.

    path = revtree.package_root("HEAD~1")   # then PYTHONPATH=path for a subprocess

So a benchmark can run the code of two revisions side by side in one run
(``worker_bench.py --compare-rev``), both seeing the same machine, instead of
comparing figures from two runs minutes apart on a noisy 2-core box. The
revision's files come from ``git archive``; the import layout from that
revision's own ``pyproject.toml`` (``[tool.setuptools.package-dir]``): the
root package is copied, each mapped subpackage symlinked in. Python finds it
through ``PYTHONPATH`` before the editable install of the working tree.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_root(rev: str, into: Path | None = None) -> Path:
    """A directory holding ``piopiy_voice`` as of ``rev`` (a new temporary one by default)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    base = Path(into or tempfile.mkdtemp(prefix=f"pv-{sha[:8]}-"))
    tree = base / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg_root = base / "pkg"
    (pkg_root / "piopiy_voice").parent.mkdir(parents=True, exist_ok=True)
    for name, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        target = pkg_root / Path(*name.split("."))
        if name == "piopiy_voice":
            subprocess.run(["cp", "-r", str(tree / folder), str(target)], check=True)
        else:
            target.symlink_to(tree / folder, target_is_directory=True)
    return pkg_root
