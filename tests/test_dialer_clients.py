"""The dialer's per-process clients (``workers.dialer.clients``), without workers:
one of each per process, rebuilt (never closed) after a fork, the environment
merged into HTTP requests once per host."""

from __future__ import annotations

import os

import requests

from piopiy_voice.settings import Settings
from piopiy_voice.workers.dialer import clients as dialer_clients
from piopiy_voice.workers.dialer.clients import ProcessClients, _Session, process_clients, start_process
from piopiy_voice.workers.dialer.worker import DialerWorker, ForkingDialerWorker, make_worker


def _settings(**extra) -> Settings:
    return Settings.from_env({"PIOPIY_APP_ID": "4242", "PIOPIY_APP_TOKEN": "t",
                              "PIOPIY_BASE_URL": "http://127.0.0.1:9", **extra})


def test_one_set_of_clients_per_process_and_a_new_one_after_a_fork(monkeypatch):
    monkeypatch.setattr(dialer_clients, "_current", None)  # restored after the test
    settings = _settings()
    start_process(settings)
    first = process_clients()
    assert process_clients() is first and first.settings is settings
    rest = first.rest()
    assert first.rest() is rest and rest.max_retries == 0  # the job decides about retries
    child_pid = os.getpid() + 1
    monkeypatch.setattr(dialer_clients.os, "getpid", lambda: child_pid)  # a forked child
    child = process_clients()
    assert child is not first and child.settings is settings  # plain data: kept
    assert child.rest() is not rest
    assert rest.session.adapters  # the parent's session was not closed by the child


def test_discarded_rest_client_is_closed_and_replaced():
    pc = ProcessClients(_settings())
    rest = pc.rest()
    closed = []
    rest.session.close = lambda: closed.append(True)
    pc.discard_rest()
    assert closed == [True] and pc.rest() is not rest


def test_bad_rest_settings_fail_every_time_and_cache_nothing():
    pc = ProcessClients(Settings.from_env({}))
    for _ in range(2):
        try:
            pc.rest()
        except ValueError as exc:
            assert "PIOPIY_APP_ID" in str(exc)
        else:
            raise AssertionError("a client without credentials was built")


def test_records_client_is_the_queue_client_or_one_per_process(redis_url):
    queue_conn = object()
    assert ProcessClients(_settings(REDIS_URL=redis_url)).records(queue_conn) is queue_conn
    apart = ProcessClients(_settings(REDIS_URL=redis_url, PV_QUEUE_REDIS_URL=redis_url))
    records = apart.records(queue_conn)
    assert records is not queue_conn and apart.records(queue_conn) is records
    assert records.ping()


def test_session_merges_the_environment_once_per_host_with_requests_own_result(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "direct.example")
    calls = []
    real = requests.Session.merge_environment_settings

    def counting(self, *args):
        calls.append(args[0])
        return real(self, *args)

    monkeypatch.setattr(requests.Session, "merge_environment_settings", counting)
    session = _Session()
    for url in ("https://rest.example/v2/a", "https://rest.example/v2/b", "https://direct.example/x"):
        for _ in range(3):
            got = session.merge_environment_settings(url, {}, None, None, None)
            assert got == real(requests.Session(), url, {}, None, None, None)
    assert calls == ["https://rest.example/v2/a", "https://direct.example/x"]
    assert session.merge_environment_settings("https://rest.example/", {}, None, None, None)[
        "proxies"]["https"] == "http://proxy.example:3128"
    assert not session.merge_environment_settings("https://direct.example/", {}, None, None, None)[
        "proxies"].get("https")


def test_worker_modes(r):
    from rq import Queue  # noqa: PLC0415

    q = Queue("modes", connection=r)
    assert type(make_worker([q], r)) is DialerWorker
    forking = make_worker([q], r, fork=True)
    assert type(forking) is ForkingDialerWorker and forking._work_horse_killed_handler is not None


def test_heartbeat_is_one_round_trip_with_the_same_commands(r):
    from rq import Queue  # noqa: PLC0415

    worker = make_worker([Queue("hb", connection=r)], r)
    worker.register_birth()
    sent = []
    real = type(r).execute_command

    def spy(self, *args, **kw):
        sent.append(args[0])
        return real(self, *args, **kw)

    pipes = []
    real_pipe = type(r).pipeline

    def pipe_spy(self, *a, **kw):
        p = real_pipe(self, *a, **kw)
        pipes.append(p)
        return p

    try:
        type(r).execute_command = spy
        type(r).pipeline = pipe_spy
        worker.heartbeat()
    finally:
        type(r).execute_command = real
        type(r).pipeline = real_pipe
    assert sent == [] and len(pipes) == 1  # nothing sent on its own: one pipeline
    ttl = r.ttl(worker.key)
    assert worker.worker_ttl + 50 < ttl <= worker.worker_ttl + 60
    assert r.hget(worker.key, "last_heartbeat")
    worker.register_death()
