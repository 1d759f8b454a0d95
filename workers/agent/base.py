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
- Slow work (a model, a speech service, a webhook) never runs inside
  ``on_event``: return ``self.work(name, fn, *args, timeout_s=..., **kw)`` in the
  same list as commands, and the worker's agent runtime (``piopiy_voice.workers.runtime``)
  runs it concurrently. ``fn`` is an async function (awaited), an async generator
  function (each item yielded arrives as ``WorkDone(final=False, index=i)``, then
  ``WorkDone(final=True, value=None)``) or a plain function (run in a thread).
  Its result comes back as a ``contracts.WorkDone`` event, in order with the
  call's other events: JSON-able values in ``value``, ``bytes`` in ``pcm``, a
  tuple ``(json_value, bytes)`` in both; failures as ``ok=False`` with ``error``
  ``"timeout"``, ``"cancelled"``, ``"lost"`` or the exception text.
  ``Work.id`` is deterministic (``"<call_id>:w<n>"``, ``n`` checkpointed with
  the agent's state by this base class), so a replay asks for the same ids.
  ``self.cancel(work_id)`` (returned in the list too) cancels one.
  A takeover mid-reply re-asks: the function and its arguments are not
  checkpointed, so after a worker crash the new owner delivers
  ``WorkDone(ok=False, error="lost", final=True)`` for every work that was in
  flight and has no final result in the stream; the agent asks again.
- ``on_event`` also receives ``Transcript`` (what the caller said, from the
  transcriber role) and ``WorkDone`` events.
- ``hear_ahead(frames, batch)`` (optional, a speed hook): before a loop turn's
  entries are fed, the worker hands each call's agent the PCM of that call's
  audio entries of the turn, in order, with the turn's
  ``speech.vad.VoicingBatch``, so VADs of many calls score their frames in one
  batch (``ConversationAgent`` does). Decisions must not depend on it: a frame
  not scored ahead is scored when ``on_event`` gets it.
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
from dataclasses import dataclass, field
from typing import Any, Callable

from piopiy_voice.contracts import CallStarted
from piopiy_voice.settings import Settings


@dataclass(eq=False)
class Work:
    """Slow work an agent asks the runtime to run (made by ``Agent.work``)."""

    id: str
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 10.0


@dataclass(frozen=True)
class Cancel:
    """Cancel a work in flight (made by ``Agent.cancel``); it then ends with
    ``WorkDone(ok=False, error="cancelled")`` unless it finished first."""

    work_id: str


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
        #: Works asked so far (ids ``<call_id>:w<n>``); checkpointed by ``to_state``.
        self._work_n = 0

    # -- decisions -----------------------------------------------------
    def on_event(self, event: Any, now: float) -> list[Any]:
        raise NotImplementedError

    def next_wakeup(self) -> float | None:
        """When the agent wants a ``Tick`` (epoch seconds), or None."""
        return None

    def hear_ahead(self, frames: list[bytes], batch: Any) -> None:
        """The PCM of this turn's audio entries, before they are fed (see the
        module docstring): nothing to do unless the agent has a VAD to batch."""

    # -- persistence ---------------------------------------------------
    #: Attributes saved by ``to_state`` and restored by ``from_state`` as they are.
    _FIELDS: tuple[str, ...] = ()

    def to_state(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self._FIELDS}
        n = getattr(self, "_work_n", 0)
        if n:  # agents that never ask for work keep the state they always had
            state["_work_n"] = n
        return state

    @classmethod
    def from_state(cls, call: CallStarted, settings: Settings, data: dict[str, Any]) -> "Agent":
        agent = cls(call, settings)
        for name in cls._FIELDS:
            if name in data:
                setattr(agent, name, data[name])
        agent._work_n = int(data.get("_work_n", 0) or 0)
        return agent

    # -- helpers -------------------------------------------------------
    def command(self, model: type, **fields: Any) -> Any:
        """A command model for this call (``seq``/``command_id`` set by the runtime)."""
        return model(call_id=self.call.call_id, **fields)

    def work(self, name: str, fn: Callable[..., Any], *args: Any, timeout_s: float = 10.0,
             **kwargs: Any) -> Work:
        """Slow work for the runtime (see the module docstring); return it with
        your commands. Its results arrive later as ``WorkDone`` events."""
        if not callable(fn):
            raise TypeError(f"work {name!r}: fn must be callable, got {type(fn).__name__}")
        if not timeout_s > 0:
            raise ValueError(f"work {name!r}: timeout_s must be > 0, got {timeout_s!r}")
        self._work_n = getattr(self, "_work_n", 0) + 1
        return Work(id=f"{self.call.call_id}:w{self._work_n}", name=str(name), fn=fn,
                    args=args, kwargs=kwargs, timeout_s=float(timeout_s))

    def cancel(self, work_id: str) -> Cancel:
        """Cancel a work in flight; return it with your commands."""
        return Cancel(work_id=work_id)


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
