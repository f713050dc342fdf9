"""`instructloop up` as a user runs it: a real process with its own engine and a private Redis
(AOF, appendfsync always) in the data directory; Ctrl-C (SIGINT) stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructloop.hardware import cpu_engine_installed, engine_omp_env
from instructloop.redis_server import free_port
from instructloop.v1 import completion_pb2, completion_pb2_grpc, model_pb2, model_pb2_grpc
from tests.support.server import RECONNECT_EVERY_SECOND


def test_cli_help_lists_the_verbs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "instructloop", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "serve" in out and "up" in out
    out = subprocess.run(
        [sys.executable, "-m", "instructloop", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    flags = ("--model", "--grpc-port", "--metrics-port", "--redis-url", "--kv-cache-space-gib")
    for flag in (*flags, "--http-port"):
        assert flag in out


def test_serve_refuses_half_a_tls_pair(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "instructloop", "serve", "--tls-cert", str(tmp_path / "c.pem")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and "both --tls-cert and --tls-key" in p.stderr


@pytest.mark.slow
@pytest.mark.engine
def test_up_serves_and_stops_on_ctrl_c(tmp_path: Path, model_dir: Path) -> None:
    port, mport, hport = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        INSTRUCTLOOP_DATA_DIR=str(tmp_path / "data"),
        INSTRUCTLOOP_API_KEYS="cli-user",
        INSTRUCTLOOP_ADMIN_KEYS="cli-admin",
    )
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "instructloop", "up", "--model", str(model_dir),
         "--grpc-port", str(port), "--metrics-port", str(mport), "--kv-cache-space-gib", "1",
         "--worker-metrics-port", str(free_port()), "--http-port", str(hport)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=RECONNECT_EVERY_SECOND) as ch:
            deadline = time.monotonic() + 600
            while True:
                assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "not SERVING in time"
                try:
                    r = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(1)
            resp = completion_pb2_grpc.CompletionServiceStub(ch).Complete(
                completion_pb2.CompletionRequest(prompt="Hello", max_tokens=3),
                metadata=[("authorization", "Bearer cli-user")],
            )
            assert resp.logged
            sm = model_pb2_grpc.ModelServiceStub(ch).GetServingModel(
                model_pb2.GetServingModelRequest(), metadata=[("authorization", "Bearer cli-admin")]
            )
            assert sm.model.version == resp.model_version == sm.live_version
            # The OpenAI-compatible HTTP API, on by default under `up`, same keys.
            req = urllib.request.Request(
                f"http://127.0.0.1:{hport}/v1/models",
                headers={"Authorization": "Bearer cli-user"},
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                assert json.load(r)["data"][0]["id"] == resp.model_version
        text = (tmp_path / "up.log").read_text()
        assert f"gRPC: 127.0.0.1:{port}" in text and "metrics: http://" in text
        assert f"OpenAI API: http://127.0.0.1:{hport}/v1" in text
        if engine_omp_env(None) and cpu_engine_installed():  # a small CPU machine, as CI's
            # Set before torch loaded (else the server says it was too late).
            assert "engine: OpenMP threads spin 20000 turns" in text, text[-3000:]
            assert "torch was loaded before" not in text
        assert "event loop: uvloop" in text  # ServerConfig.event_loop "auto", uvloop installed
        redis_url = next(
            line.split("redis: ", 1)[1].strip()
            for line in text.splitlines()
            if "redis: redis://" in line
        )
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert r.hget(f"il:cmpl:{resp.completion_id}", "record")
        assert r.config_get("appendfsync")["appendfsync"] == "always"
        r.close()
        assert list((tmp_path / "data" / "redis").rglob("*.aof*"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        log.close()
    text = (tmp_path / "up.log").read_text()
    assert rc == 0, text[-3000:]
    assert "redis: stopping" in text
    assert "worker: started" in text and "beat: started" in text
    assert "worker, beat: stopped" in text
    from instructloop.redis_server import is_reachable

    assert not is_reachable(redis_url)


def test_the_training_loop_does_not_inherit_the_servers_engine_settings() -> None:
    """`up` starts the worker and beat with this process's environment and their Redis, less
    what the server set for its own engine (GOMP_SPINCOUNT)."""
    from instructloop.cli.up import training_env as loop_env

    env = loop_env(
        {"PATH": "/bin", "GOMP_SPINCOUNT": "20000", "REDIS_URL": "redis://old"},
        "redis://127.0.0.1:1/0",
        {"GOMP_SPINCOUNT": "20000"},
    )
    assert env == {"PATH": "/bin", "REDIS_URL": "redis://127.0.0.1:1/0"}
