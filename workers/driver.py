"""The pure per-call core of the worker: stream entries in, an ``Outcome`` out.

Theory of operation
-------------------
A ``CallDriver`` owns everything one call's decisions depend on: the agent,
the checkpoint (stream position, agent state, command counter, runtime
bookkeeping) and the commands decided but not yet published. It never talks
to Redis, sockets or the clock: the runner (``piopiy_voice.workers.runner``)
hands it raw entries as XREAD returned them (``feed``), timer turns
(``tick``), "the stream has been read to its end" (``caught_up``) and
"the gateway died for good" (``end_orphan``), and executes the ``Outcome``
each returns: publish the commands atomically with ``checkpoint()``, start and
cancel works in the agent runtime, append timeline notes, write dead letters,
count skipped entries. After a successful commit the runner calls
``committed()``. Tests feed it fields built with ``contracts.encode``.

Per entry, in stream order:

- entries that fail to decode become dead letters (a poison entry's ``seq``
  still advances the dedup position: it is not a gap);
- gateway entries (``seq`` > 0) are deduplicated by ``seq``; a jump counts the
  entries trimmed or lost before we read them (``Outcome.skipped``, and a
  ``worker.skipped`` note); ``seq`` 0 entries (``transcript``, ``work.done``)
  are not sequenced;
- a later ``call.started`` means the platform reconnected to another gateway:
  commands follow the socket (``call.gateway_id`` changes);
- a ``work.done`` is given to the agent only while its work is in flight
  (the checkpoint lists works in flight, ids and names); its final result
  ends the work. A result of a work not in flight (a duplicate from a replay,
  or a late one) is ignored;
- anything else goes to the agent, which is retried up to ``AGENT_ATTEMPTS``
  times and then dead-lettered; what it returns is split into commands
  (stamped with deterministic ids ``<call_id>:<n>``), works to start and works
  to cancel;
- ``call.ended`` is the last entry processed.

Takeover: works in flight at the last checkpoint ran in the dead worker's
runtime, whose results are fenced by the lease we now hold. Once the stream
has been read to its end (``caught_up``), every such work without a final
result is delivered to the agent as ``WorkDone(ok=False, error="lost")``: a
takeover mid-reply re-asks.

Stale audio after a takeover (the rule): from ``resume`` until ``caught_up``
the driver is *replaying* the backlog the previous owner left. While
replaying, a command that produces audio (``PlayAudio``, ``Speak``,
``PlayMusic``: ``AUDIO_COMMANDS``) decided on an entry older than
``stale_ms`` (wall time minus the entry id's time) is suppressed: the agent's
state moves on as if it had been sent (its later ``Interrupt``/``ClearAudio``,
hang-up, transfer and every other state-changing command are kept), but nothing
is published, so the caller never hears a reply that was started and
interrupted before we got the call. Suppressed commands take no command
number, are counted (``Outcome.stale``) and noted on the timeline
(``worker.stale_suppressed``). Outside a replay nothing is suppressed.

Reconnect: a call announced again while its record is live or suspended is
resumed from its checkpoint even when that checkpoint says ``done`` (the
socket dropped and came back: ``resume`` reports ``reconnect``); the runner
keeps dropping calls whose record says ended.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from piopiy_voice import keys
from piopiy_voice.contracts import CallEnded, CallStarted, WorkDone, audio_pcms, decode, is_command

from .agent.base import Agent, Cancel, Tick, Work
from .checkpoint import Checkpoint

log = logging.getLogger("piopiy_voice.workers.driver")

AGENT_ATTEMPTS = 3
#: Commands that make the caller hear something (suppressed when stale in a replay).
AUDIO_COMMANDS = frozenset({"cmd.play_audio", "cmd.speak", "cmd.play_music"})
#: Commands the runner commits and delivers the moment they are decided, before
#: the rest of the loop turn's calls are fed (see ``piopiy_voice.workers.runner``,
#: step 4): a barge-in's cut is the one decision a caller hears the delay of.
URGENT_COMMANDS = frozenset({"cmd.interrupt"})
#: Default staleness bound of a replayed audio command (ms).
DEFAULT_STALE_MS = 500
#: After an agent raised on a Tick, no Tick for this long (seconds).
TICK_QUIET_S = 1.0


id_ms = keys.entry_ms  # the name the worker modules use


class DeadLetter:
    __slots__ = ("entry_id", "stream", "reason", "type")

    def __init__(self, entry_id: str, stream: str, reason: str, type: str = "") -> None:
        self.entry_id, self.stream, self.reason, self.type = entry_id, stream, reason, type


class Outcome:
    """What the runner must do after one input to a ``CallDriver``."""

    __slots__ = ("commands", "works", "cancels", "notes", "dead_letters", "finished",
                 "skipped", "entries", "ignored", "ended", "dirty", "stale")

    def __init__(self) -> None:
        #: Stamped commands decided now (also queued in ``CallDriver.pending``
        #: until ``committed``): publish them with the checkpoint.
        self.commands: list[Any] = []
        #: Works to start in the agent runtime.
        self.works: list[Work] = []
        #: Work ids to cancel.
        self.cancels: list[str] = []
        #: Timeline notes: (event, detail).
        self.notes: list[tuple[str, dict[str, Any]]] = []
        self.dead_letters: list[DeadLetter] = []
        #: Final ``WorkDone`` results given to the agent (for the metrics).
        self.finished: list[WorkDone] = []
        #: Gateway entries missing (trimmed or lost) before the ones fed.
        self.skipped = 0
        #: Entries fed.
        self.entries = 0
        #: ``work.done`` entries ignored (work not in flight).
        self.ignored = 0
        #: The call ended: commit with release.
        self.ended = False
        #: The checkpoint moved: commit it (at least about once a second).
        self.dirty = False
        #: Stale audio commands suppressed while replaying (see the module docstring).
        self.stale = 0

    @property
    def urgent(self) -> bool:
        """A command decided now must not wait for the loop turn's end (``URGENT_COMMANDS``)."""
        return any(c.type in URGENT_COMMANDS for c in self.commands)


class CallDriver:
    """One call's decisions (see the module docstring)."""

    def __init__(self, call: CallStarted, agent: Agent, ckpt: Checkpoint, issued_by: str,
                 observe_lag: Callable[[float], None] | None = None) -> None:
        self.call = call
        self.agent = agent
        self.ckpt = ckpt
        self.issued_by = issued_by
        self.observe_lag = observe_lag
        self.stream = keys.call_stream(call.call_id)
        #: Stamped commands not yet published (kept across failed commits).
        self.pending: list[Any] = []
        self.ended = False
        self.dirty = False
        #: Works in flight when we took the call over: "lost" unless their final
        #: result is found before the stream's end.
        self.suspects: set[str] = set()
        self._tick_quiet_until = 0.0
        #: Replaying the backlog after a takeover (until ``caught_up``).
        self.replaying = False
        #: Staleness bound of replayed audio commands (ms); 0 disables.
        self.stale_ms = DEFAULT_STALE_MS
        #: Age (s) of the entry being decided; 0 for ticks and synthetic events.
        self._age_s = 0.0
        #: ``last_id`` of the last committed checkpoint ("" before the first).
        self.committed_id = ""
        ckpt.runtime.setdefault("works", {})

    # ------------------------------------------------------------ starting
    @classmethod
    def start(cls, agent_cls: type[Agent], settings: Any, call: CallStarted, worker_id: str,
              observe_lag: Callable[[float], None] | None = None, entry_id: str = "",
              ) -> tuple["CallDriver", Outcome]:
        """A new call: the agent is built and given ``call`` (its greeting).
        Raises what the agent's constructor raises."""
        agent = agent_cls(call, settings)
        ckpt = Checkpoint(call_id=call.call_id, runtime={"seq": call.seq, "skipped": 0})
        drv = cls(call, agent, ckpt, f"worker:{worker_id}", observe_lag)
        out = Outcome()
        out.dirty = drv.dirty = True
        out.notes.append(("worker.owned", {"worker": worker_id}))
        drv._decide(call, call.started_at, entry_id, out)
        return drv, out

    @classmethod
    def resume(cls, agent_cls: type[Agent], settings: Any, call: CallStarted, ckpt: Checkpoint,
               worker_id: str, observe_lag: Callable[[float], None] | None = None,
               ) -> tuple["CallDriver", Outcome, str]:
        """A call taken over from ``ckpt``; returns the driver, an outcome (the
        ``worker.claimed`` note) and how the previous owner left:
        ``handback``, ``crash`` or ``reconnect`` (the checkpoint said done
        but the call was announced again while live: the socket came back)."""
        reconnect = ckpt.done
        ckpt.done = False
        agent = agent_cls.from_state(call, settings, ckpt.state or {})
        # Agents overriding to_state without super() still get fresh work ids.
        agent._work_n = max(getattr(agent, "_work_n", 0), int(ckpt.runtime.get("work_n", 0)))
        kind = "handback" if ckpt.runtime.pop("handed_back", None) else "crash"
        if reconnect:
            kind = "reconnect"
        drv = cls(call, agent, ckpt, f"worker:{worker_id}", observe_lag)
        drv.suspects = set(ckpt.runtime["works"])
        drv.replaying = True
        drv.committed_id = ckpt.last_id
        stale_ms = getattr(settings, "stale_command_ms", None)
        if stale_ms is not None:
            drv.stale_ms = int(stale_ms)
        out = Outcome()
        out.notes.append(("worker.claimed", {"worker": worker_id, "previous": ckpt.owner,
                                             "after": kind, "resume_from": ckpt.last_id}))
        return drv, out, kind

    # -------------------------------------------------------------- inputs
    def hear_ahead(self, entries: list[tuple[Any, Any]], batch: Any) -> None:
        """Before ``feed(entries)``: the agent's ``hear_ahead`` with the PCM of
        the audio entries (a speed hook; see ``Agent.hear_ahead``)."""
        frames = audio_pcms(entries)
        if frames:
            try:
                self.agent.hear_ahead(frames, batch)
            except Exception:  # noqa: BLE001 (a speed hook: ``feed`` still hears every frame)
                log.exception("call %s: the agent's hear_ahead failed", self.call.call_id)

    def feed(self, entries: list[tuple[Any, Any]], wall: float) -> Outcome:
        """Entries of the call's stream after ``ckpt.last_id``, in order, as
        XREAD returns them (ids and field maps, bytes or str)."""
        out = Outcome()
        out.dirty = self.dirty = True  # XREAD never returns a stream with no entries
        ckpt = self.ckpt
        rt = ckpt.runtime
        works = rt["works"]
        observe = self.observe_lag
        n = 0
        for raw_id, fields in entries:
            n += 1
            eid = raw_id.decode() if raw_id.__class__ is bytes else raw_id
            t = id_ms(eid) / 1000.0
            if observe is not None:
                observe(wall - t if wall > t else 0.0)
            ckpt.last_id = eid
            self._age_s = wall - t
            try:
                ev = decode(fields)
            except Exception as exc:  # noqa: BLE001 (poison entry: any failure)
                out.dead_letters.append(DeadLetter(eid, self.stream, f"decode failed: {exc}",
                                                   _type_of(fields)))
                raw_seq = fields.get(b"seq", fields.get("seq", b""))
                raw_seq = raw_seq.decode() if isinstance(raw_seq, bytes) else str(raw_seq)
                if raw_seq.isdigit() and int(raw_seq) > rt.get("seq", 0):
                    rt["seq"] = int(raw_seq)  # a poison entry is not a gap
                continue
            seq = ev.seq
            if seq > 0:
                last = rt.get("seq", 0)
                if seq <= last:
                    continue  # duplicate (gateway resent after a reconnect)
                if seq > last + 1 and last > 0:
                    self._skipped(seq - last - 1, eid, out)
                rt["seq"] = seq
            etype = ev.type
            if etype == "call.started":
                self._follow_gateway(ev.gateway_id)
                continue
            if etype == "work.done":
                if ev.work_id not in works:
                    out.ignored += 1
                    continue
                if ev.final:
                    del works[ev.work_id]
                    self.suspects.discard(ev.work_id)
                    out.finished.append(ev)
            self._decide(ev, t, eid, out)
            if etype == "call.ended":
                out.ended = self.ended = True
                break
        self._age_s = 0.0
        out.entries = n
        return out

    def tick(self, wall: float) -> Outcome | None:
        """The worker's clock: a ``Tick`` if the agent asked for one by ``wall``
        (None when there is nothing to do)."""
        if self.ended or wall < self._tick_quiet_until:
            return None
        wake = self.agent.next_wakeup()
        if wake is None or wall < wake:
            return None
        try:
            items = self.agent.on_event(Tick(), wall)
        except Exception as exc:  # noqa: BLE001 (agents are user code)
            log.error("call %s: agent raised on tick: %r", self.call.call_id, exc)
            self._tick_quiet_until = wall + TICK_QUIET_S
            return None
        out = Outcome()
        out.dirty = self.dirty = True
        self._route(items, "", out)
        return out

    def caught_up(self, wall: float) -> Outcome | None:
        """The stream has been read to its end: works in flight at the takeover
        with no final result are lost, and the replay is over (see the module
        docstring)."""
        self.replaying = False
        if not self.suspects:
            return None
        works = self.ckpt.runtime["works"]
        out = Outcome()
        out.dirty = self.dirty = True
        for work_id in sorted(self.suspects):
            name = works.pop(work_id, None)
            if name is None:
                continue
            ev = WorkDone(call_id=self.call.call_id, work_id=work_id, name=name, ok=False,
                          final=True, error="lost")
            out.notes.append(("worker.work_lost", {"work_id": work_id, "name": name}))
            out.finished.append(ev)
            if not self.ended:
                self._decide(ev, wall, self.ckpt.last_id, out)
        self.suspects.clear()
        return out

    def end_orphan(self, wall: float) -> Outcome:
        """The call's gateway died for good: the agent is told
        ``CallEnded(reason="gateway_lost")``; its commands are dropped (nobody
        is left to apply them)."""
        out = Outcome()
        out.dirty = self.dirty = True
        ev = CallEnded(call_id=self.call.call_id, seq=0, reason="gateway_lost")
        self._decide(ev, wall, self.ckpt.last_id, out)
        self.pending = []
        out.commands = []
        out.ended = self.ended = True
        return out

    def next_wakeup(self) -> float | None:
        return None if self.ended else self.agent.next_wakeup()

    # ------------------------------------------------------------- commits
    def checkpoint(self, *, handback: bool = False) -> Checkpoint:
        """The checkpoint to publish with ``pending`` (state filled in now)."""
        ckpt = self.ckpt
        ckpt.state = self.agent.to_state()
        ckpt.done = self.ended
        n = getattr(self.agent, "_work_n", 0)
        if n:
            ckpt.runtime["work_n"] = n
        if handback:
            ckpt.runtime["handed_back"] = True
        return ckpt

    def committed(self) -> None:
        """The runner published ``pending`` with the checkpoint."""
        self.ckpt.runtime.pop("handed_back", None)
        self.pending = []
        self.dirty = False
        self.committed_id = self.ckpt.last_id

    def uncommitted(self) -> None:
        """The commit was not made (e.g. a hand-back whose commit failed)."""
        self.ckpt.runtime.pop("handed_back", None)

    def works_in_flight(self) -> dict[str, str]:
        return dict(self.ckpt.runtime["works"])

    # ------------------------------------------------------------- helpers
    def _decide(self, ev: Any, now: float, eid: str, out: Outcome) -> None:
        err: Exception | None = None
        for _ in range(AGENT_ATTEMPTS):
            try:
                items = self.agent.on_event(ev, now)
                break
            except Exception as exc:  # noqa: BLE001 (agents are user code)
                err = exc
        else:
            log.error("call %s: agent raised %d times on %s: %r", self.call.call_id,
                      AGENT_ATTEMPTS, eid, err)
            out.dead_letters.append(DeadLetter(eid, self.stream, f"agent raised: {err!r}",
                                               getattr(ev, "type", "")))
            return
        if items:
            self._route(items, eid, out)

    def _route(self, items: Any, eid: str, out: Outcome) -> None:
        ckpt = self.ckpt
        cid = self.call.call_id
        stale = (self.replaying and self.stale_ms > 0 and self._age_s * 1000 > self.stale_ms)
        for item in items:
            if is_command(item):
                if stale and item.type in AUDIO_COMMANDS:
                    out.stale += 1
                    out.notes.append(("worker.stale_suppressed", {
                        "command": item.type, "entry": eid, "age_ms": int(self._age_s * 1000)}))
                    continue
                ckpt.cmd_seq += 1
                item.call_id = cid
                item.seq = ckpt.cmd_seq
                item.command_id = f"{cid}:{ckpt.cmd_seq}"
                item.issued_by = self.issued_by
                self.pending.append(item)
                out.commands.append(item)
            elif isinstance(item, Work):
                ckpt.runtime["works"][item.id] = item.name
                out.works.append(item)
            elif isinstance(item, Cancel):
                out.cancels.append(item.work_id)
            else:
                out.dead_letters.append(DeadLetter(
                    eid, self.stream, f"agent returned {type(item).__name__}, not a command, "
                    f"Work or Cancel", "agent.result"))

    def _skipped(self, n: int, eid: str, out: Outcome) -> None:
        rt = self.ckpt.runtime
        rt["skipped"] = rt.get("skipped", 0) + n
        out.skipped += n
        out.notes.append(("worker.skipped", {"entries": n, "before": eid}))
        log.warning("call %s: %d entries missing before %s (trimmed or lost)",
                    self.call.call_id, n, eid)

    def _follow_gateway(self, gateway_id: str) -> None:
        """Send the call's commands to ``gateway_id`` from now on (the socket moved)."""
        if gateway_id and gateway_id != self.call.gateway_id:
            log.warning("call %s: socket moved from gateway %s to %s; commands follow it",
                        self.call.call_id, self.call.gateway_id, gateway_id)
            self.call = self.call.model_copy(update={"gateway_id": gateway_id})


def _type_of(fields: Any) -> str:
    t = fields.get(b"type", fields.get("type", b"")) if hasattr(fields, "get") else b""
    return t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
