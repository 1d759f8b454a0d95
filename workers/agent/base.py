"""The agent interface: events in, commands out, state you can serialise.

An agent decides for ONE call. The worker runtime creates one instance per
call, feeds it that call's events strictly in order and publishes whatever
commands it returns. The runtime, not the agent, owns every side effect: the
agent never touches Redis, sockets or the wall clock. That purity is what lets
a call survive its worker: the runtime checkpoints ``to_state()`` together with
the stream position and the commands it published, and another worker rebuilds
the agent with ``from_state()`` and carries on.

Contract
--------
- ``on_event(event, now) -> list[Command]`` is called with, in stream order:
  ``CallStarted`` (once), ``AudioFrame``, ``PlatformEvent``, ``CommandResult``,
  ``Playout``, ``StreamGap``, ``CallEnded`` (last; made by the runtime with
  reason ``gateway_lost`` when the call's gateway died for good, and then the
  commands returned are dropped: nobody is left to apply them), plus ``Tick`` when the
  runtime's clock passes ``next_wakeup()`` (timers while no audio arrives,
  e.g. during a pause). ``now`` is seconds since the epoch: the time of the
  stream entry for stream events, the worker's clock for ``Tick``. Never read
  ``time.time()`` yourself: replaying the same events must give the same
  commands.
- Commands are ``piopiy_voice.contracts`` command models. Build them with
  ``self.command(Model, **fields)``: ``call_id`` is filled in; the runtime
  overwrites ``seq``/``command_id`` with deterministic values.
- ``to_state()`` returns JSON-able data; ``from_state(call, settings, data)``
  rebuilds an equivalent agent. Keep state small (it is written about once a
  second per call and with every batch of commands). Plain JSON-able
  attributes need no code: list their names in ``_FIELDS`` and the base
  class saves and restores them; override both methods for anything else.
- Raising from ``on_event`` is treated as a poison entry: the runtime retries
  the same entry up to 3 times, then dead-letters it and moves on. State
  changes made before the exception stay, so mutate state after the checks
  that may fail.

Example (plug it in with ``piopiy-voice worker --agent mypkg.bot:Echo``)::

    from piopiy_voice.contracts import AudioFrame, Hangup, Speak
    from piopiy_voice.workers.agent.base import Agent

    class Echo(Agent):
        _FIELDS = ("frames",)                   # checkpointed with the call

        def __init__(self, call, settings):
            super().__init__(call, settings)
            self.frames = 0

        def on_event(self, event, now):
            if isinstance(event, AudioFrame):
                self.frames += 1
                if self.frames == 500:          # 10 s of audio
                    return [self.command(Speak, text="Ten seconds."),
                            self.command(Hangup)]
            return []
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any

from piopiy_voice.contracts import CallStarted
from piopiy_voice.settings import Settings


@dataclass(frozen=True)
class Tick:
    """A timer event: the worker's clock reached the agent's ``next_wakeup()``."""

    type: str = "tick"


class Agent:
    """Base class of every agent (see the module docstring for the contract)."""

    def __init__(self, call: CallStarted, settings: Settings) -> None:
        if not isinstance(call, CallStarted):
            raise TypeError(f"call must be a CallStarted, got {type(call).__name__}")
        self.call = call
        self.settings = settings

    # -- decisions -----------------------------------------------------
    def on_event(self, event: Any, now: float) -> list[Any]:
        raise NotImplementedError

    def next_wakeup(self) -> float | None:
        """When the agent wants a ``Tick`` (epoch seconds), or None."""
        return None

    # -- persistence ---------------------------------------------------
    #: Attributes saved by ``to_state`` and restored by ``from_state`` as they are.
    _FIELDS: tuple[str, ...] = ()

    def to_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._FIELDS}

    @classmethod
    def from_state(cls, call: CallStarted, settings: Settings, data: dict[str, Any]) -> "Agent":
        agent = cls(call, settings)
        for name in cls._FIELDS:
            if name in data:
                setattr(agent, name, data[name])
        return agent

    # -- helpers -------------------------------------------------------
    def command(self, model: type, **fields: Any) -> Any:
        """A command model for this call (``seq``/``command_id`` set by the runtime)."""
        return model(call_id=self.call.call_id, **fields)


def load_agent_class(spec: str) -> type[Agent]:
    """``"package.module:Class"`` -> the class, checked to be an ``Agent``."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"agent must be 'package.module:Class', got {spec!r}")
    module_name, class_name = spec.split(":")
    if not module_name or not class_name:
        raise ValueError(f"agent must be 'package.module:Class', got {spec!r}")
    # Like ``python -m``: an agent module in the current directory is found even
    # though the ``piopiy-voice`` console script does not put it on sys.path.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"agent module {module_name!r} cannot be imported: {exc} "
                         f"(searched the current directory and PYTHONPATH)") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"agent module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise ValueError(f"agent {spec!r} is not a subclass of piopiy_voice.workers.agent.base.Agent")
    return cls
