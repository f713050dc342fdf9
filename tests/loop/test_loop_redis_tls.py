"""The training loop's processes over Redis with TLS (rediss://), against a real redis-server
that has no plaintext port: the Celery app's broker and backend settings, a real
`instructloop worker` that runs a tick sent over TLS, and a real `instructloop beat` whose ticks
reach that worker."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from instructloop.training.loop.celery_app import TICK_TASK, create_app, redis_tls
from instructloop.training.loop.config import LoopConfig
from tests.support.loop import REPO, loop_env, wait_for
from tests.support.redis_tls import TlsRedis
from tests.support.worker import WorkerProc


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    proc = TlsRedis(tmp_path_factory.mktemp("redis-tls")).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_tls_settings_leave_the_url_typed_and_a_bare_rediss_url_checks_the_certificate() -> None:
    url, tls = redis_tls(
        "rediss://:pw@cache.example:6380/2?ssl_ca_certs=/etc/ca.crt&ssl_cert_reqs=optional"
        "&ssl_check_hostname=false&socket_timeout=5"
    )
    assert url == "rediss://:pw@cache.example:6380/2?socket_timeout=5"
    assert tls == {
        "ssl_ca_certs": "/etc/ca.crt",
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_check_hostname": False,
    }
    # Without settings the certificate is still checked (kombu alone would not check it).
    assert redis_tls("rediss://cache.example:6380/0") == (
        "rediss://cache.example:6380/0",
        {"ssl_cert_reqs": ssl.CERT_REQUIRED},
    )
    assert redis_tls("redis://127.0.0.1:6379/0") == ("redis://127.0.0.1:6379/0", None)
    with pytest.raises(ValueError, match="ssl_cert_reqs='sometimes'"):
        redis_tls("rediss://h:1/0?ssl_cert_reqs=sometimes")


def test_the_celery_app_reaches_broker_and_backend_over_tls(tls_redis: TlsRedis) -> None:
    app = create_app(LoopConfig(redis_url=tls_redis.url(1)))
    assert app.conf.broker_use_ssl["ssl_ca_certs"] == str(tls_redis.ca)
    assert app.conf.redis_backend_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        assert conn.default_channel.client.ping()
    assert app.backend.client.ping()
    app.backend.client.close()
    # A bare rediss:// URL checks the server against the system's roots, which do not hold
    # the test CA: no connection (kombu's own default would have connected unchecked).
    bare = create_app(LoopConfig(redis_url=f"rediss://127.0.0.1:{tls_redis.port}/1"))
    with bare.connection_for_write() as conn, pytest.raises(Exception, match="CERTIFICATE_VERIFY"):
        conn.ensure_connection(max_retries=0)


def test_a_worker_and_a_beat_run_over_tls(tls_redis: TlsRedis, tmp_path: Path) -> None:
    url = tls_redis.url(2)
    worker = WorkerProc(redis_url=url, log_path=tmp_path / "worker.log", pool="solo").start()
    beat: subprocess.Popen[str] | None = None
    app = create_app(LoopConfig(redis_url=url))
    try:
        # A task sent over TLS, run by the worker, its result read back from the TLS backend.
        res = app.send_task(TICK_TASK, kwargs={"every_s": 0, "threshold": 0}, queue="training")
        assert res.get(timeout=60) == {"result": "not_due"}
        # The beat's ticks go through the same broker to the same worker.
        beat = subprocess.Popen(
            [sys.executable, "-m", "instructloop", "beat", "--tick", "1", "--every", "0",
             "--no-wait", "--loglevel", "INFO"],
            env=loop_env(url), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        wait_for(lambda: worker.log().count("succeeded in") >= 2, 60, "a tick of the beat to run")
        assert beat.poll() is None, "the beat exited"
    finally:
        if beat is not None:
            beat.send_signal(signal.SIGTERM)
            try:
                beat.wait(timeout=20)
            except subprocess.TimeoutExpired:
                beat.kill()
                beat.wait()
        worker.stop()
        app.backend.client.close()
