"""Redis over TLS (``rediss://``) for every client, against a real TLS redis-server.

Each test module run makes its own certificate authority, a server certificate
(for 127.0.0.1 / localhost), a client certificate (mutual TLS) and a second,
unrelated CA (the "wrong CA"), with the ``openssl`` command, then starts private
``redis-server`` processes on free loopback TLS ports (``--port 0``: no plain
port at all). Skipped only when no TLS-capable redis-server exists *and* ``CI``
is unset; in CI that is a failure (CI installs Debian's redis-server, built with
TLS).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from piopiy_voice import contracts, keys
from piopiy_voice.errors import PiopiyConfigError
from piopiy_voice.gateway.publisher import Publisher
from piopiy_voice.redisconn import (
    TLS_KWARG, RedisTls, RedisTlsError, connect, connect_async, free_port, ssl_context,
)
from piopiy_voice.workers.runtime import RedisPublisher

PASSWORD = "s3cret-pw-never-logged"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki():
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make the test certificates")
    d = Path(tempfile.mkdtemp(prefix="pv-tls-"))
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
               "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n")
    _make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _tls_server_binary() -> str | None:
    for path in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if path and os.path.exists(path):
            return path
    return None


class TlsRedis:
    """A private redis-server speaking TLS only, on a free loopback port."""

    def __init__(self, pki: Path, *, auth_clients: str) -> None:
        binary = _tls_server_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pv-tls-redis-")
        self.ca = str(pki / "ca.crt")
        self.url = f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0"
        self.proc = None
        why = "no redis-server on this machine"
        if binary:
            self.proc = subprocess.Popen(
                [binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                 "--tls-cert-file", str(pki / "server.crt"), "--tls-key-file", str(pki / "server.key"),
                 "--tls-ca-cert-file", self.ca, "--tls-auth-clients", auth_clients,
                 "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", self.dir],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            why = self._wait_ready(pki)
        if why:
            self.close()
            if os.environ.get("CI"):
                pytest.fail(f"CI must run the TLS tests: {why} (install Debian's redis-server)")
            pytest.skip(f"no TLS-capable redis-server: {why}")

    def _wait_ready(self, pki: Path) -> str:
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace").strip().splitlines()
                return f"redis-server exited: {out[-1] if out else self.proc.returncode}"
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n"
                              % (len(PASSWORD), PASSWORD.encode()))
                    got = b""
                    while b"PONG" not in got:
                        chunk = s.recv(64)
                        if not chunk:
                            break
                        got += chunk
                    if b"PONG" in got:
                        return ""
            except OSError:
                pass
            time.sleep(0.05)
        return "redis-server did not answer over TLS within 10 s"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_redis(pki):
    """Server certificate verified by clients; client certificates optional."""
    server = TlsRedis(pki, auth_clients="optional")
    yield server
    server.close()


@pytest.fixture(scope="module")
def mtls_redis(pki):
    """Mutual TLS: the server requires a client certificate signed by its CA."""
    server = TlsRedis(pki, auth_clients="yes")
    yield server
    server.close()


@pytest.fixture
def tls(pki):
    return RedisTls(ca_file=str(pki / "ca.crt"))


@pytest.fixture
def mtls(pki):
    return RedisTls(ca_file=str(pki / "ca.crt"), cert_file=str(pki / "client.crt"),
                    key_file=str(pki / "client.key"))


# ------------------------------------------------------------ the gateway's writer


def test_gateway_publisher_writes_audio_over_tls_that_decodes(tls_redis, tls):
    call_id = "tls-call-1"
    frames = [bytes([i]) * 320 for i in range(1, 41)]

    async def main() -> Publisher:
        pub = Publisher(tls_redis.url, tls=tls, linger_s=0)
        pub.start()
        prefix = pub.audio_prefix(call_id)
        for seq, pcm in enumerate(frames, start=1):
            assert pub.add_audio(prefix, seq, pcm)
        assert await pub.flush(timeout=10)
        await pub.close()
        return pub

    pub = asyncio.run(main())
    assert pub.metrics.c["frames_published"] == len(frames)
    r = connect(tls_redis.url, tls=tls)
    entries = r.xrange(keys.call_stream(call_id))
    got = [contracts.decode(fields) for _, fields in entries]
    assert [(m.call_id, m.seq, m.pcm) for m in got] == [(call_id, i, f) for i, f in enumerate(frames, 1)]
    r.close()


def test_gateway_publisher_with_the_wrong_ca_reports_the_setting_not_the_password(tls_redis, pki):
    wrong = RedisTls(ca_file=str(pki / "other-ca.crt"))

    async def main() -> Publisher:
        pub = Publisher(tls_redis.url, tls=wrong, connect_timeout=2)
        pub.start()
        deadline = asyncio.get_running_loop().time() + 10
        while not pub.last_error and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await pub.close(timeout=0.5)
        return pub

    pub = asyncio.run(main())
    assert not pub.connected
    assert "PV_REDIS_TLS_CA_FILE" in pub.last_error and "failed verification" in pub.last_error
    assert PASSWORD not in pub.last_error


# ------------------------------------------------------------ redis-py clients


def test_worker_sync_client_over_tls(tls_redis, tls):
    r = connect(tls_redis.url, tls=tls)
    assert isinstance(r.connection_pool.connection_kwargs[TLS_KWARG], ssl.SSLContext)
    r.xadd("pv:tls:s", {"a": "1"})
    assert r.xrange("pv:tls:s")[0][1] == {b"a": b"1"}
    r.close()


def test_async_clients_over_tls_plain_and_blocking_pool(tls_redis, tls):
    async def main() -> list:
        out = []
        for kw in ({}, {"blocking_pool": True, "max_connections": 4}):
            ar = connect_async(tls_redis.url, tls=tls, **kw)
            await ar.set("pv:tls:k", b"v")
            out.append(await ar.get("pv:tls:k"))
            await ar.aclose()
        return out

    assert asyncio.run(main()) == [b"v", b"v"]


def test_worker_agent_runtime_publisher_rebuilds_the_tls_client(tls_redis, tls):
    # The worker's agent runtime builds its asyncio client from the sync
    # client's connection kwargs: TLS must survive that copy.
    r = connect(tls_redis.url, tls=tls)
    pub = RedisPublisher(r.connection_pool.connection_kwargs, "w-tls")

    async def main():
        try:
            return await pub.client.ping()
        finally:
            await pub.client.aclose()

    assert asyncio.run(main()) is True
    r.close()


def _double(x: int) -> int:
    return 2 * x


def test_dialer_rq_connection_over_tls(tls_redis, tls):
    # The dialer runs an RQ worker (with scheduler) on a connect() client; RQ
    # forks a work horse and rebuilds connections from the pool's kwargs.
    from rq import Queue, Worker
    from rq.job import JobStatus

    conn = connect(tls_redis.url, tls=tls)
    queue = Queue("tls-calls", connection=conn)
    job = queue.enqueue(_double, 21)
    Worker([queue], connection=conn, name="tls-dialer").work(burst=True, with_scheduler=True)
    job.refresh()
    assert job.get_status() == JobStatus.FINISHED and job.return_value() == 42
    conn.close()


def test_mutual_tls_with_a_client_certificate(mtls_redis, mtls, tls):
    r = connect(mtls_redis.url, tls=mtls)
    assert r.ping() is True
    r.close()
    # The same server refuses a client without a certificate.
    bare = connect(mtls_redis.url, tls=tls, retry_on_error=[])
    with pytest.raises(redis.ConnectionError):
        bare.ping()
    bare.close()


def test_publisher_over_mutual_tls(mtls_redis, mtls):
    async def main() -> bool:
        pub = Publisher(mtls_redis.url, tls=mtls, linger_s=0)
        pub.start()
        pub.xadd("pv:tls:mtls", {"type": "x"})
        ok = await pub.flush(timeout=10)
        await pub.close()
        return ok

    assert asyncio.run(main())
    assert connect(mtls_redis.url, tls=mtls).xlen("pv:tls:mtls") == 1


# ------------------------------------------------------------ clear errors


def test_wrong_ca_is_refused_with_one_line_naming_the_setting(tls_redis, pki):
    r = connect(tls_redis.url, tls=RedisTls(ca_file=str(pki / "other-ca.crt")), retry_on_error=[])
    with pytest.raises(RedisTlsError) as info:
        r.ping()
    msg = str(info.value)
    assert isinstance(info.value, PiopiyConfigError) and isinstance(info.value, redis.ConnectionError)
    assert "PV_REDIS_TLS_CA_FILE" in msg and f"127.0.0.1:{tls_redis.port}" in msg
    assert "\n" not in msg and PASSWORD not in msg


def test_wrong_ca_async_names_the_setting(tls_redis, pki):
    async def main():
        ar = connect_async(tls_redis.url, tls=RedisTls(ca_file=str(pki / "other-ca.crt")),
                           retry_on_error=[])
        try:
            await ar.ping()
        finally:
            await ar.aclose()

    with pytest.raises(redis.ConnectionError, match="PV_REDIS_TLS_CA_FILE"):
        asyncio.run(main())


def test_system_trust_store_does_not_trust_a_private_ca(tls_redis):
    # No CA file: the system's CAs, which never signed the test's CA.
    r = connect(tls_redis.url, tls=RedisTls(), retry_on_error=[])
    with pytest.raises(RedisTlsError, match="PV_REDIS_TLS_CA_FILE"):
        r.ping()


def test_verify_false_connects_but_is_logged_as_insecure(tls_redis, caplog):
    ssl_context.cache_clear()
    with caplog.at_level(logging.WARNING, logger="piopiy_voice.redisconn"):
        r = connect(tls_redis.url, tls=RedisTls(verify=False))
        assert r.ping() is True
    assert any("INSECURE" in rec.getMessage() and "PV_REDIS_TLS_VERIFY" in rec.getMessage()
               for rec in caplog.records)
    r.close()


@pytest.mark.parametrize("tls, var", [
    (RedisTls(ca_file="/nonexistent/ca.pem"), "PV_REDIS_TLS_CA_FILE"),
    (RedisTls(cert_file="/nonexistent/client.pem", key_file="/nonexistent/client.key"),
     "PV_REDIS_TLS_CERT_FILE"),
    (RedisTls(key_file="/nonexistent/client.key"), "PV_REDIS_TLS_KEY_FILE"),
])
def test_unusable_files_are_config_errors_at_build(tls, var):
    url = f"rediss://:{PASSWORD}@127.0.0.1:6390/0"
    for build in (lambda: connect(url, tls=tls), lambda: connect_async(url, tls=tls),
                  lambda: Publisher(url, tls=tls)):
        with pytest.raises(PiopiyConfigError, match=var) as info:
            build()
        assert PASSWORD not in str(info.value)


def test_a_non_pem_ca_file_is_a_config_error(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(PiopiyConfigError, match="PV_REDIS_TLS_CA_FILE"):
        connect("rediss://127.0.0.1:6390/0", tls=RedisTls(ca_file=str(bad)))


def test_settings_come_from_the_environment(tls_redis, pki, monkeypatch):
    monkeypatch.setenv("PV_REDIS_TLS_CA_FILE", str(pki / "ca.crt"))
    monkeypatch.setenv("PV_REDIS_TLS_VERIFY", "true")
    assert RedisTls.from_env() == RedisTls(ca_file=str(pki / "ca.crt"))
    r = connect(tls_redis.url)  # no tls= : the roles' way
    assert r.ping() is True
    r.close()
    assert RedisTls.from_env({"PV_REDIS_TLS_VERIFY": "false"}).verify is False
    with pytest.raises(PiopiyConfigError, match="PV_REDIS_TLS_VERIFY"):
        RedisTls.from_env({"PV_REDIS_TLS_VERIFY": "maybe"})


def test_gateway_cli_exits_2_with_one_line_for_a_missing_ca():
    env = {**os.environ, "REDIS_URL": f"rediss://:{PASSWORD}@127.0.0.1:6390/0",
           "PV_REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"}
    proc = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "gateway", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "PV_REDIS_TLS_CA_FILE" in proc.stderr and "Traceback" not in proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout


# ------------------------------------------------------------ redis:// unchanged


def test_plain_redis_urls_are_unchanged(redis_url, pki):
    # TLS settings present, but a redis:// URL: plain TCP as before.
    tls = RedisTls(ca_file=str(pki / "ca.crt"))
    r = connect(redis_url, tls=tls)
    assert r.connection_pool.connection_class is redis.Connection
    assert TLS_KWARG not in r.connection_pool.connection_kwargs
    assert r.ping() is True
    r.close()
    assert Publisher(redis_url, tls=tls)._ssl is None

    async def main():
        ar = connect_async(redis_url, tls=tls)
        try:
            assert TLS_KWARG not in ar.connection_pool.connection_kwargs
            return await ar.ping()
        finally:
            await ar.aclose()

    assert asyncio.run(main()) is True
