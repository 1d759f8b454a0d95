"""Shared fixtures.

Integration tests run against a real Redis: ``REDIS_URL`` when set (it is
flushed before each test: point it at a disposable database), otherwise a
private redis-server this session starts on a free loopback port (see
``piopiy_voice.redisconn.EmbeddedRedis``), so parallel runs never share state.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

from piopiy_voice.redisconn import EmbeddedRedis, connect  # noqa: E402


@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def r(redis_url):
    """A sync client on a flushed database."""
    client = connect(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def subprocess_env(redis_url):
    """Environment for child processes of a test: our Redis, and the tests'
    helper modules (test agents such as ``workers_support:CountingAgent``)
    importable; the project itself is imported as installed."""
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.setdefault("PV_LOG_LEVEL", "INFO")
    return env
