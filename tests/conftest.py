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


# ------------------------------------------------------------ Redis Cluster

def _cluster_or_skip():
    from cluster_support import LocalCluster, cluster_binary  # noqa: PLC0415

    if not cluster_binary():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must run the cluster tests: no redis-server (install Debian's)")
        pytest.skip("no redis-server binary on this machine")
    return LocalCluster(primaries=3, replicas=1, node_timeout_ms=1000)


@pytest.fixture(scope="session")
def redis_cluster():
    """A private 3-primary / 3-replica Redis Cluster for the whole session
    (``tests/cluster_support.LocalCluster``: ``.url``, ``.nodes``,
    ``.primary_port_for(key)``, ``.kill_primary_of(key)``, ``.wait_healthy()``,
    ``.heal()``). Skipped without redis-server, failed under CI."""
    cluster = _cluster_or_skip()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def rc(redis_cluster):
    """A sync cluster client (``connect(redis_cluster.url)``) on a healthy, flushed
    cluster: nodes a previous test killed are restarted first."""
    redis_cluster.heal()
    redis_cluster.flushall()
    client = connect(redis_cluster.url)
    try:
        yield client
    finally:
        client.close()
