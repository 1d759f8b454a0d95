"""Load a file of ``examples/`` or ``bench/`` as a module, by path.

The examples are scripts a user copies, and the benchmark harnesses scripts
run from their folder, not packages of the project, so they are never
importable by name; tests load them the way ``python FILE`` runs them. A
harness that imports a sibling by name (``from callsim import ...``) needs that
sibling loaded first (its name is then in ``sys.modules``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BENCH = ROOT / "bench"


def _load(folder: Path, name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module
    spec.loader.exec_module(module)
    return module


def load_example(name: str) -> ModuleType:
    return _load(EXAMPLES, name)


def load_bench(name: str) -> ModuleType:
    return _load(BENCH, name)
