"""speech.llm.ChatClient against the local fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import time

import pytest

from piopiy_voice.errors import PiopiyError
from piopiy_voice.speech.llm import (ChatClient, Delta, LlmConfig, LlmConnectionError, LlmError,
                                     LlmHttpError, LlmProtocolError, LlmTimeout)
from fake_openai import FakeOpenAI, Reply

TOOLS = [{"type": "function", "function": {"name": "transfer_to_human", "parameters": {
    "type": "object", "properties": {"reason": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "hang_up", "parameters": {"type": "object"}}}]
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture
def fake():
    f = FakeOpenAI()
    yield f
    f.close()


def _client(fake, **kw):
    cfg = dict(base_url=fake.base_url, model="fake-1", timeout_s=2.0, first_token_s=1.0)
    cfg.update(kw)
    return ChatClient(LlmConfig(**cfg))


def _collect(client, tools=None, msgs=MSGS):
    async def go():
        out, stamps = [], []
        t0 = time.monotonic()
        try:
            async for d in client.stream(msgs, tools):
                out.append(d)
                stamps.append(time.monotonic() - t0)
        finally:
            await client.aclose()
        return out, stamps
    return asyncio.run(go())


def test_streams_text_token_by_token_and_sends_the_request(fake):
    fake.default = Reply(text="Hello there. We open at nine.", token_delay_s=0.03)
    out, stamps = _collect(_client(fake, api_key="sk-test", temperature=0.2, max_tokens=50))
    texts = [d.text for d in out if d.text]
    assert "".join(texts) == "Hello there. We open at nine."
    assert len(texts) == 6  # one Delta per streamed token: nothing is buffered
    assert stamps[len(texts) - 1] - stamps[0] >= 0.1  # they arrived spread out, as streamed
    assert out[-1] == Delta(finish_reason="stop")
    body = fake.requests[0]
    assert body["stream"] is True and body["model"] == "fake-1" and body["messages"] == MSGS
    assert body["temperature"] == 0.2 and body["max_tokens"] == 50 and "tools" not in body


def test_streamed_tool_call_fragments_are_assembled(fake):
    fake.default = Reply(text="Connecting you now.", tool_calls=[
        {"name": "transfer_to_human", "arguments": '{"reason": "caller asked for a person"}'}])
    out, _ = _collect(_client(fake), tools=TOOLS)
    assert "".join(d.text for d in out) == "Connecting you now."
    last = out[-1]
    assert last.finish_reason == "tool_calls" and len(last.tool_calls) == 1
    call = last.tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("call_0", "transfer_to_human",
                                                    {"reason": "caller asked for a person"})
    assert fake.requests[0]["tools"] == TOOLS and fake.requests[0]["tool_choice"] == "auto"


def test_non_streaming_server_reply_is_accepted(fake):
    fake.default = Reply(text="Fine.", stream=False, tool_calls=[{"name": "hang_up", "arguments": "{}"}])
    out, _ = _collect(_client(fake), tools=TOOLS)
    assert out[0].text == "Fine." and out[-1].tool_calls[0].name == "hang_up"


@pytest.mark.parametrize("reply, error, match", [
    (Reply(first_token_delay_s=1.5), LlmTimeout, "no first token within 0.3s"),
    (Reply(status=500), LlmHttpError, "HTTP 500"),
    (Reply(drop_after=3), LlmConnectionError, "stream cut|before \\[DONE\\]"),
    (Reply(bad_chunk_at=2), LlmProtocolError, "not JSON"),
    (Reply(tool_calls=[{"name": "launch_rockets", "arguments": "{}"}]), LlmProtocolError,
     "unknown tool 'launch_rockets'"),
    (Reply(tool_calls=[{"name": "hang_up", "arguments": '{"now": tru'}]), LlmProtocolError,
     "arguments are not JSON"),
    (Reply(tool_calls=[{"name": "hang_up", "arguments": '[1]'}]), LlmProtocolError,
     "must be a JSON object"),
])
def test_failures_raise_typed_errors_quickly(fake, reply, error, match):
    fake.default = reply
    t0 = time.monotonic()
    with pytest.raises(error, match=match) as info:
        _collect(_client(fake, first_token_s=0.3), tools=TOOLS)
    assert isinstance(info.value, LlmError) and isinstance(info.value, PiopiyError)
    assert time.monotonic() - t0 < 1.0


def test_total_deadline_bounds_a_trickling_reply(fake):
    fake.default = Reply(text="one two three four five six seven eight nine ten", token_delay_s=0.1)
    t0 = time.monotonic()
    with pytest.raises(LlmTimeout, match="reply not complete within 0.4s") as info:
        _collect(_client(fake, timeout_s=0.4, first_token_s=0.3))
    assert info.value.phase == "total"
    assert 0.35 < time.monotonic() - t0 < 0.8


def test_unreachable_server_is_a_connection_error():
    client = ChatClient(LlmConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=1,
                                  first_token_s=0.5))
    with pytest.raises(LlmConnectionError, match="cannot reach"):
        _collect(client)


def test_strict_server_rejects_unanswered_tool_calls(fake):
    msgs = MSGS + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "hang_up", "arguments": "{}"}}]}]
    with pytest.raises(LlmHttpError, match="400.*not answered"):
        _collect(_client(fake), msgs=msgs)


def test_config_from_env_and_per_call_params():
    cfg = LlmConfig.from_env({"PV_LLM_BASE_URL": "http://h:1/v1/", "PV_LLM_MODEL": "m1",
                              "PV_LLM_TIMEOUT_S": "5", "PV_LLM_FIRST_TOKEN_S": "9"})
    assert (cfg.base_url, cfg.model, cfg.timeout_s, cfg.first_token_s) == ("http://h:1/v1", "m1", 5, 5)
    call = cfg.with_params({"model": "m2", "temperature": "0.9", "base_url": "http://evil"})
    assert (call.model, call.temperature, call.base_url) == ("m2", 0.9, "http://h:1/v1")
    with pytest.raises(LlmError, match="temperature"):
        cfg.with_params({"temperature": "hot"})
    with pytest.raises(LlmError, match="PV_LLM_TIMEOUT_S"):
        LlmConfig.from_env({"PV_LLM_TIMEOUT_S": "-1"})
    with pytest.raises(LlmError, match="http"):
        LlmConfig(base_url="ftp://x")


def test_a_kept_alive_connection_carries_the_next_reply_and_an_abandoned_one_is_not_reused(fake):
    """A server that keeps connections open (hosted APIs, vLLM) serves one
    client's replies on one connection; a reply abandoned halfway (a barge-in
    cancels it) closes its connection, so its unread rest never reaches the
    next reply, which arrives whole on another connection."""
    fake.keep_alive = True
    fake.default = Reply(text="one two three four five six seven eight nine ten.", token_delay_s=0.01)
    client = _client(fake)

    async def go():
        texts = []
        try:
            for _ in range(3):
                texts.append("".join([d.text async for d in client.stream(MSGS)]))
            async for d in client.stream(MSGS):
                if d.text:
                    break   # the caller barged in: the rest of this reply is dropped
            texts.append("".join([d.text async for d in client.stream(MSGS)]))
        finally:
            await client.aclose()
        return texts

    texts = asyncio.run(go())
    assert texts == [fake.default.text] * 4
    # Reused: a whole reply's connection goes back to the pool once its body's
    # end is read, which happens off the caller's path, so the next request
    # may find it busy still and open a second one; never more.
    assert len(set(fake.peers[:4])) <= 2
    assert fake.peers[3] not in fake.peers[4:]   # the abandoned reply's connection: gone


def test_a_request_dropped_unanswered_is_sent_once_more_on_a_new_connection(fake):
    """A server closes an idle kept-alive connection at the end of its own
    keep-alive timeout; a request that meets that close gets no answer. It
    is sent once more, on a new connection: the caller hears the reply, not
    an apology."""
    fake.keep_alive = True
    fake.replies.extend([Reply(text="First."), Reply(hang_up=True), Reply(text="Second.")])
    client = _client(fake)

    async def go():
        try:
            first = "".join([d.text async for d in client.stream(MSGS)])
            await asyncio.sleep(0.2)   # the first reply's connection back in the pool
            second = "".join([d.text async for d in client.stream(MSGS)])
        finally:
            await client.aclose()
        return first, second

    assert asyncio.run(go()) == ("First.", "Second.")
    assert len(fake.requests) == 3
    assert fake.peers[1] == fake.peers[0]      # the dropped request went on the kept-alive one
    assert fake.peers[2] != fake.peers[1]      # the resend on a new connection


def test_a_request_dropped_twice_is_a_connection_error_not_a_loop(fake):
    fake.replies.extend([Reply(hang_up=True), Reply(hang_up=True), Reply(text="never asked")])
    with pytest.raises(LlmConnectionError, match="cannot reach"):
        _collect(_client(fake))
    assert len(fake.requests) == 2
