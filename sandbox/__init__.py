"""A local Piopiy platform: REST endpoints, PCMO execution, scripted callers, reports.

Start it in-process with :class:`Sandbox` (``url = Sandbox(...).start()``) or as
``piopiy-voice sandbox``. See ``sandbox/README.md`` for what it emulates and the
behaviour it defines where the platform's docs are silent.
"""

from .platform import PlatformOptions, SandboxCall
from .report import load_report
from .scenario import Scenario, ScenarioError, bundled_names, load_scenario, parse_scenario
from .server import DEV_APP_ID, DEV_APP_TOKEN, Sandbox

__all__ = [
    "DEV_APP_ID", "DEV_APP_TOKEN", "PlatformOptions", "Sandbox", "SandboxCall", "Scenario",
    "ScenarioError", "bundled_names", "load_report", "load_scenario", "parse_scenario",
]
