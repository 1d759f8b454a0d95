"""The agent runtime: agents' slow work, run concurrently off the worker loop.

Theory of operation
-------------------
The worker's loop is synchronous and must stay fast (VAD, DTMF, barge-in,
commits for hundreds of calls). Anything slow an agent needs (a language
model, a speech service, a webhook, synthesis) is a ``Work``
(``Agent.work(...)``, see ``piopiy_voice.workers.agent.base``). The runner
hands works to an ``AgentRuntime``: ONE asyncio event loop on a background
thread of the worker process, started on the first work.

- async functions are awaited; async generator functions are iterated (each
  item is a ``WorkDone(final=False, index=i)``, then ``WorkDone(final=True,
  value=None)``); plain functions run in a thread (``asyncio.to_thread``);
- each work has a total deadline (``timeout_s``, counted from submission, so
  time spent queued counts): ``WorkDone(ok=False, error="timeout")``;
  ``cancel`` -> ``error="cancelled"``; an exception -> ``ok=False`` with its
  text;
- at most ``concurrency`` works run at once (``PV_AGENT_RUNTIME_CONCURRENCY``,
  default 256); the others wait in line (a semaphore);
- results: JSON-able -> ``value``; ``bytes`` -> ``pcm``; a tuple
  ``(json_value, bytes)`` -> both; anything else -> ``ok=False``.

Each result is XADDed as a ``contracts.WorkDone`` entry (``seq`` 0) into the
call's OWN stream (``keys.call_stream``) by a small Lua script that first checks
that the call's lease is still this worker's (fencing: a worker that lost the
call, or handed it back, publishes nothing). The runtime has its own Redis
connection (asyncio), never the loop's. So a result wakes the worker's XREAD
at once, is handled by the call's driver in order with the call's other
events, is replayed after a takeover, and shows on the timeline
(``piopiy-voice status``). Works in flight are listed (ids and names) in the
call's checkpoint; a takeover re-asks (see ``piopiy_voice.workers.driver``).

``run_now(call_id, work)`` runs one work to completion in the calling thread
and returns its results: for tests of agents, with no Redis and no thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import threading
from typing import Any, Awaitable, Callable

import redis

from piopiy_voice import keys
from piopiy_voice.contracts import WorkDone, encode

from .agent.base import Work

log = logging.getLogger("piopiy_voice.workers.runtime")

DEFAULT_CONCURRENCY = 256
MAX_ERROR_CHARS = 500
#: A result the runtime could not write (Redis down) is retried this long.
PUBLISH_RETRY_S = 10.0

Publish = Callable[[str, WorkDone], Awaitable[bool]]

# KEYS: lease, call stream; ARGV: worker id, stream maxlen, field/value pairs...
_PUBLISH_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return 1
"""


def _text(exc: BaseException) -> str:
    msg = str(exc)
    return (f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)[:MAX_ERROR_CHARS]


def result(call_id: str, work: Work, value: Any, *, final: bool = True, index: int = 0) -> WorkDone:
    """A work's value as a ``WorkDone`` (see the module docstring for the
    shapes); a value that is not JSON-able becomes ``ok=False``."""
    pcm = b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value, pcm = None, bytes(value)
    elif (isinstance(value, tuple) and len(value) == 2
          and isinstance(value[1], (bytes, bytearray, memoryview))):
        value, pcm = value[0], bytes(value[1])
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return WorkDone(call_id=call_id, work_id=work.id, name=work.name, ok=False, final=True,
                        index=index, error=f"result is not JSON-able: {_text(exc)}")
    return WorkDone(call_id=call_id, work_id=work.id, name=work.name, final=final, index=index,
                    value=value, pcm=pcm)


async def execute(call_id: str, work: Work, emit: Publish,
                  slots: asyncio.Semaphore | None = None) -> None:
    """Run ``work``; ``await emit(call_id, WorkDone)`` for each result, the
    last one ``final``. Never raises (cancellation becomes a result)."""
    index = 0
    last: WorkDone | None = None
    try:
        async with asyncio.timeout(work.timeout_s):
            if slots is not None:
                await slots.acquire()
            try:
                fn = work.fn
                if inspect.isasyncgenfunction(fn):
                    agen = fn(*work.args, **work.kwargs)
                    try:
                        async for item in agen:
                            done = result(call_id, work, item, final=False, index=index)
                            if not done.ok:
                                last = done
                                break
                            await emit(call_id, done)
                            index += 1
                    finally:
                        await agen.aclose()
                    if last is None:
                        last = WorkDone(call_id=call_id, work_id=work.id, name=work.name,
                                        final=True, index=index)
                else:
                    if inspect.iscoroutinefunction(fn):
                        value = await fn(*work.args, **work.kwargs)
                    else:
                        value = await asyncio.to_thread(fn, *work.args, **work.kwargs)
                        if inspect.isawaitable(value):
                            value = await value
                    last = result(call_id, work, value, index=index)
            finally:
                if slots is not None:
                    slots.release()
    except TimeoutError:
        last = _failed(call_id, work, "timeout", index)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        last = _failed(call_id, work, "cancelled", index)
    except Exception as exc:  # noqa: BLE001 (work functions are user code)
        last = _failed(call_id, work, _text(exc), index)
    await emit(call_id, last)


def _failed(call_id: str, work: Work, error: str, index: int) -> WorkDone:
    return WorkDone(call_id=call_id, work_id=work.id, name=work.name, ok=False, final=True,
                    index=index, error=error)


def run_now(call_id: str, work: Work) -> list[WorkDone]:
    """Run one work to its end here and now; its results in order (tests)."""
    out: list[WorkDone] = []

    async def collect(_cid: str, done: WorkDone) -> bool:
        out.append(done)
        return True

    asyncio.run(execute(call_id, work, collect))
    return out


class RedisPublisher:
    """Writes results into the call's stream, fenced by the call's lease."""

    def __init__(self, connection_kwargs: Any, worker_id: str,
                 lease_key: Callable[[str], str] = keys.call_lease) -> None:
        from piopiy_voice.redisconn import async_redis_like

        # The same Redis (or Sentinel service), credentials, timeouts and TLS as the loop's client.
        self.client = async_redis_like(connection_kwargs)
        self.worker_id = worker_id
        self.lease_key = lease_key
        self._script = self.client.register_script(_PUBLISH_LUA)
        self.fenced = 0

    async def __call__(self, call_id: str, done: WorkDone) -> bool:
        args: list[Any] = [self.worker_id, keys.CALL_STREAM_MAXLEN]
        for k, v in encode(done).items():
            args += [k, v]
        delay = 0.05
        loop = asyncio.get_running_loop()
        give_up = loop.time() + PUBLISH_RETRY_S
        while True:
            try:
                ok = await self._script(keys=[self.lease_key(call_id), keys.call_stream(call_id)],
                                        args=args)
                break
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if loop.time() + delay > give_up:
                    log.error("call %s: result of work %s lost: redis unavailable (%s)",
                              call_id, done.work_id, exc)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if not ok:
            self.fenced += 1
            log.info("call %s: result of work %s dropped: the call is no longer ours",
                     call_id, done.work_id)
        return bool(ok)

    async def close(self) -> None:
        await self.client.aclose()


class AgentRuntime:
    """One asyncio loop on a background thread running agents' works (see the
    module docstring). ``submit``/``cancel`` are called from the worker loop."""

    def __init__(self, publish: Publish, *, concurrency: int = DEFAULT_CONCURRENCY,
                 name: str = "agent-runtime", on_close: Callable[[], Awaitable[None]] | None = None,
                 ) -> None:
        if int(concurrency) < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.publish = publish
        self.concurrency = int(concurrency)
        self.name = name
        self._on_close = on_close
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None
        #: work id -> (call id, task); touched only on the runtime's thread.
        self._tasks: dict[str, tuple[str, asyncio.Task]] = {}
        #: Written by the worker loop only / by the runtime's thread only (no
        #: read-modify-write across threads): ``in_flight`` is their difference.
        self.submitted = 0
        self.finished = 0

    # -- worker-loop side -----------------------------------------------
    def submit(self, call_id: str, work: Work) -> None:
        loop = self._ensure_started()
        self.submitted += 1
        loop.call_soon_threadsafe(self._spawn, call_id, work)

    @property
    def in_flight(self) -> int:
        """Works submitted and not finished (queued ones included)."""
        return self.submitted - self.finished

    def cancel(self, work_id: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel, work_id)

    def cancel_call(self, call_id: str) -> None:
        """Cancel every work of a call (it was lost: its results would be fenced)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel_call, call_id)

    def stop(self, grace_s: float = 1.0) -> None:
        """Let works finish for up to ``grace_s``, cancel the rest, stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(grace_s), loop)
        try:
            fut.result(grace_s + 5.0)
        except (concurrent.futures.TimeoutError, Exception) as exc:  # noqa: BLE001
            log.warning("agent runtime: unclean shutdown (%r)", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        self._loop = self._thread = None

    # -- runtime-thread side ----------------------------------------------
    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            # Plain functions run in threads: enough for blocking clients,
            # bounded so a flood of them cannot start thousands of threads.
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
                max_workers=min(64, self.concurrency), thread_name_prefix=f"{self.name}-fn"))
            self._slots = asyncio.Semaphore(self.concurrency)
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(5.0)
        assert self._loop is not None, "agent runtime did not start"
        return self._loop

    def _spawn(self, call_id: str, work: Work) -> None:
        if work.id in self._tasks:
            self.finished += 1  # already running (a replayed request): one run is enough
            return
        task = asyncio.get_running_loop().create_task(
            execute(call_id, work, self._emit, self._slots), name=work.id)
        self._tasks[work.id] = (call_id, task)
        task.add_done_callback(lambda _t: self._finished(work.id))

    def _finished(self, work_id: str) -> None:
        self._tasks.pop(work_id, None)
        self.finished += 1

    async def _emit(self, call_id: str, done: WorkDone) -> bool:
        try:
            return await self.publish(call_id, done)
        except Exception:  # noqa: BLE001 (never let a publish failure kill the work's task)
            log.exception("call %s: could not publish result of work %s", call_id, done.work_id)
            return False

    def _cancel(self, work_id: str) -> None:
        entry = self._tasks.get(work_id)
        if entry is not None:
            # After the task's first step (queued when it was created): a task
            # cancelled before it ever ran could not report "cancelled".
            asyncio.get_running_loop().call_soon(entry[1].cancel)

    def _cancel_call(self, call_id: str) -> None:
        loop = asyncio.get_running_loop()
        for cid, task in list(self._tasks.values()):
            if cid == call_id:
                loop.call_soon(task.cancel)

    async def _shutdown(self, grace_s: float) -> None:
        tasks = [t for _, t in self._tasks.values()]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        if self._on_close is not None:
            await self._on_close()
