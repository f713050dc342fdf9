"""Server lifecycle: TLS, graceful shutdown, and surviving the death of the engine process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructloop.v1 import completion_pb2
from tests.support.rpc import rpc_error, stubs
from tests.support.server import Served, running_server

pytestmark = pytest.mark.engine

HI = completion_pb2.CompletionRequest(prompt="Hello", max_tokens=3)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls(served: Served, serving_redis_url: str, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    async with running_server(
        None, serving_redis_url, engine=served.engine, tls_cert=cert, tls_key=key
    ) as tls:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(tls.address, creds) as ch:
            resp = await stubs(ch).completion.Complete(HI, metadata=tls.user_md)
            assert resp.choices and resp.logged
        # Plaintext to a TLS port does not get through.
        async with grpc.aio.insecure_channel(tls.address) as ch:
            call = stubs(ch).completion.Complete(HI, metadata=tls.user_md, timeout=5)
            err = await rpc_error(call)
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_graceful_shutdown_finishes_in_flight_streams(
    served: Served, serving_redis_url: str
) -> None:
    async with running_server(None, serving_redis_url, engine=served.engine) as side:
        ch = grpc.aio.insecure_channel(side.address)
        req = completion_pb2.CompletionRequest(prompt="Once upon a time", max_tokens=24)
        call = stubs(ch).completion.StreamComplete(req, metadata=side.user_md)
        first = await call.read()
        assert first is not grpc.aio.EOF
        stopping = asyncio.create_task(side.server.stop(grace=60))
        chunks = [first]
        while (c := await call.read()) is not grpc.aio.EOF:
            chunks.append(c)
        await stopping
        assert chunks[-1].HasField("usage") and chunks[-1].logged
        err = await rpc_error(stubs(ch).completion.Complete(HI, metadata=side.user_md, timeout=5))
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        await ch.close()
    # The shared engine is not stopped with a server that does not own it.
    assert served.engine.alive


def _engine_core_procs() -> list[psutil.Process]:
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            continue
        if "EngineCore" in title:
            out.append(p)
    return out


def test_small_machine_engine_uses_every_core(served: Served) -> None:
    """On a machine of at most 2 usable cores the model's threads run on all of them: vLLM's
    CPU backend would keep one core for its scheduler and leave the model the other."""
    from instructloop.hardware import RESERVED_CORES_ENV, SMALL_MACHINE_CORES

    usable = os.sched_getaffinity(0)
    if len(usable) > SMALL_MACHINE_CORES:
        pytest.skip(f"{len(usable)} cores: vLLM's own reservation applies")
    if os.environ.get(RESERVED_CORES_ENV, "0") != "0" or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        pytest.skip("the environment sets the engine's cores")
    assert served.engine.alive
    workers = [
        c
        for p in _engine_core_procs()
        for c in p.children(recursive=True)
        if "Worker" in (" ".join(c.cmdline()) or c.name())
    ]
    assert workers, "no engine worker process found"
    cores: set[int] = set()
    for w in workers:
        for t in w.threads():
            with contextlib.suppress(OSError):  # a thread that has ended meanwhile
                cores |= os.sched_getaffinity(t.id)
    assert cores == usable, f"model threads on cores {sorted(cores)} of {sorted(usable)}"


async def _health(ch: grpc.aio.Channel) -> int:
    r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    return int(r.status)


@pytest.mark.slow
async def test_engine_death_unavailable_not_serving_then_restart(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """SIGKILL the engine core (and its worker): in-flight and new requests get UNAVAILABLE,
    health turns NOT_SERVING, the server restarts the engine by itself and serves again."""
    s = stubs(channel)
    procs = _engine_core_procs()
    assert procs, "no engine core process found"
    # Greedy counting runs long: the request is in flight when the engine dies.
    long = completion_pb2.CompletionRequest(
        prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", max_tokens=1500, temperature=0.0
    )
    call = s.completion.StreamComplete(long, metadata=served.user_md)
    assert (await call.read()) is not grpc.aio.EOF
    for p in procs:
        for child in p.children(recursive=True):
            child.send_signal(signal.SIGKILL)
        p.send_signal(signal.SIGKILL)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        while (await call.read()) is not grpc.aio.EOF:
            pass
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value

    deadline = time.monotonic() + 30
    while await _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        await asyncio.sleep(0.2)
    err = await rpc_error(s.completion.Complete(HI, metadata=served.user_md))
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    deadline = time.monotonic() + 600
    while await _health(channel) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the engine was not restarted"
        await asyncio.sleep(1.0)
    resp = await s.completion.Complete(HI, metadata=served.user_md)
    assert resp.choices and resp.model_version == served.engine.model_version
    assert served.engine.restarts == 1
    with urllib.request.urlopen(served.metrics_url, timeout=10) as r:
        text = r.read().decode()
    assert "instructloop_engine_restarts_total 1.0" in text
    assert "instructloop_engine_up 1.0" in text
