"""LlmAgent: a language model answers the caller; the call controls are its tools.

Plug it in with ``piopiy-voice worker --agent piopiy_voice.workers.agent.llm:LlmAgent``.
Any OpenAI-compatible server (hosted, vLLM, llama.cpp, Ollama): ``PV_LLM_BASE_URL``,
``PV_LLM_API_KEY``, ``PV_LLM_MODEL``; per call (the dial job's params, i.e.
the ws_url query): ``system_prompt``, ``model``, ``temperature``,
``max_tokens`` (the server and key never come from a call's params).

A caller's turn starts one work, ``reply_stream``: it streams the completion
(``speech.llm.ChatClient``), cuts the tokens into sentences as they arrive
and synthesizes each while the model keeps writing (the first at once, the
next ones paced to playback: ``voice.PlaybackPacer``), yielding
``({"say": sentence}, pcm)`` per sentence, then ``{"tools": [...]}`` if the
model called any, or ``{"failed": kind, "error": ...}`` (deadline, HTTP
error, cut or malformed stream, unknown tool, bad arguments, synthesis
error). ``ConversationAgent`` plays each sentence as it comes (first audio
before the reply is complete), keeps the history honest across barge-ins,
and turns failures into an apology or, after ``PV_AGENT_MAX_FAILURES`` in a
row, a hand-off: never dead air.

Tools (the call controls): ``transfer_to_human`` (hold notice, music,
``Transfer`` to ``PV_HUMAN_AGENT_NUMBER``, then monitoring), ``hang_up``
(after what is queued has played), ``pause_for_sensitive_input`` (``Pause``
after the current sentence; ``Resume`` after ``PV_PAUSE_RESUME_AFTER_S``),
``resume_stream``, ``play_music`` (the configured hold music). Each call's
result goes back into the history as a ``tool`` message, answered in the
same turn, so the next request is well formed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from piopiy_voice import contracts as c
from piopiy_voice.speech.text import SentenceSplitter
from piopiy_voice.speech.llm import ChatClient, LlmConfig, LlmError

from .conversation import ConversationAgent
from .voice import PlaybackPacer, speak_paced

#: Work deadline beyond the model's own total deadline: synthesis of the last sentences.
TTS_MARGIN_S = 10.0

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "transfer_to_human",
        "description": "Connect the caller to a human agent. Use when they ask for a person "
                       "or you cannot help.",
        "parameters": {"type": "object", "properties": {
            "reason": {"type": "string", "description": "Why, in a few words."}}}}},
    {"type": "function", "function": {
        "name": "hang_up",
        "description": "End the call after your goodbye has been heard.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "pause_for_sensitive_input",
        "description": "Stop listening while the caller keys in sensitive data (card number, "
                       "PIN). Say what to enter first. Listening resumes automatically.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "resume_stream",
        "description": "Resume listening after a pause.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "play_music",
        "description": "Play hold music to the caller (e.g. while they wait).",
        "parameters": {"type": "object", "properties": {}}}},
]
TOOL_NAMES = frozenset(t["function"]["name"] for t in TOOLS)

_clients: dict[tuple[str, str], ChatClient] = {}


def chat_client(cfg: LlmConfig) -> ChatClient:
    """One client per server per process: connections stay warm across calls."""
    key = (cfg.base_url, cfg.api_key)
    if key not in _clients:
        _clients[key] = ChatClient(cfg)
    return _clients[key]


async def reply_stream(client: ChatClient, cfg: LlmConfig, messages: list[dict[str, Any]],
                       synth: Any, rate: int, lead_s: float = 0.0):
    """Work: the model's reply as spoken sentences and tool calls (module
    docstring); sentences paced to playback by ``lead_s`` until the model's
    own deadline (``voice.PlaybackPacer``)."""
    queue: asyncio.Queue = asyncio.Queue()
    pacer = PlaybackPacer(lead_s, asyncio.get_running_loop().time() + cfg.timeout_s)

    async def read() -> None:
        cutter = SentenceSplitter()
        try:
            async for delta in client.stream(messages, TOOLS, cfg):
                for sentence in cutter.push(delta.text):
                    queue.put_nowait(("say", sentence))
                if delta.tool_calls:
                    for sentence in cutter.flush():
                        queue.put_nowait(("say", sentence))
                    queue.put_nowait(("tools", [{"id": t.id, "name": t.name, "args": t.arguments}
                                                for t in delta.tool_calls]))
            for sentence in cutter.flush():
                queue.put_nowait(("say", sentence))
            queue.put_nowait(("end", None))
        except LlmError as exc:
            queue.put_nowait(("failed", {"failed": exc.kind, "error": f"{type(exc).__name__}: {exc}"}))

    reader = asyncio.create_task(read())
    try:
        while True:
            kind, item = await queue.get()
            if kind == "say":
                said = await speak_paced(synth, item, rate, pacer)
                yield said
                if isinstance(said, dict):  # the engine failed: this reply failed, the call goes on
                    return
            elif kind == "tools":
                yield {"tools": item}
            elif kind == "failed":
                yield item
                return
            else:
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


class LlmAgent(ConversationAgent):
    def __init__(self, call, settings):
        super().__init__(call, settings)
        try:
            self.llm = self.config.llm.with_params(call.params)
        except LlmError:
            self.llm = self.config.llm  # a bad per-call number must not kill the call
        self.system_prompt = call.params.get("system_prompt") or self.config.system_prompt

    def start_reply(self, now: float) -> list[Any]:
        messages = [{"role": "system", "content": self.system_prompt}] + self.messages()
        synth = self.synthesizer()
        work = self.work("llm_reply", reply_stream, chat_client(self.config.llm), self.llm, messages,
                         synth, self.call.rate, lead_s=self.config.speech.tts_lead_s,
                         timeout_s=self.llm.timeout_s + TTS_MARGIN_S)
        return self.begin_reply(work, now)

    def on_reply_item(self, value: dict[str, Any], now: float) -> list[Any]:
        calls = value.get("tools")
        if not isinstance(calls, list) or not calls:
            return []
        bad = [t for t in calls if not isinstance(t, dict) or t.get("name") not in TOOL_NAMES]
        if bad:
            return self._cancel_reply() + self.reply_failed("tool", f"unknown tool call {bad[0]!r}"[:200], now)
        msg = self._reply_msg()
        if msg is None:
            return []
        msg["tool_calls"] = [{"id": str(t.get("id") or f"call_{i}"), "type": "function",
                              "function": {"name": t["name"], "arguments": _json(t.get("args"))}}
                             for i, t in enumerate(calls)]
        # Tool results go right after the call (a strict server rejects anything
        # in between), then the controls run (a hand-off adds its hold notice).
        actions = []
        for tc in msg["tool_calls"]:
            name = tc["function"]["name"]
            result = "done"
            if name == "pause_for_sensitive_input":
                result = f"paused; listening resumes in {self.settings.pause_resume_after_s:g} s"
            elif name == "resume_stream" and self.mode != "paused":
                result = "not paused"
            self.history.append({"role": "tool", "tool_call_id": tc["id"], "content": result})
            actions.append(name)
        out: list[Any] = []
        for name in actions:
            if name == "transfer_to_human" and self.mode == "conversation":
                out += self.handoff(now, cut=False)
            elif name == "hang_up" and self.mode == "conversation":
                out += self.hang_up_after_speaking(now)
            elif name == "pause_for_sensitive_input" and self.mode == "conversation":
                out += self.pause_after_speaking(now)
            elif name == "resume_stream" and self.mode == "paused":
                self._resumed(now)
                out.append(self.command(c.Resume))
            elif name == "play_music":
                out.append(self.command(c.PlayMusic, file=self.call.params.get(
                    "hold_music", self.settings.hold_music)))
        return out


def _json(args: Any) -> str:
    return json.dumps(args if isinstance(args, dict) else {}, separators=(",", ":"))
