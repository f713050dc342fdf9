"""A real server in this process for tests: the real vLLM engine, real Redis, real gRPC on
free ports (`async with running_server(model_dir, redis_url) as s:`).

Nothing here is a fake; it only picks test-friendly settings (ephemeral ports, a small CPU KV
cache, fixed keys). tests/serving/conftest.py keeps one such server for the test session.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from instructloop.serving.config import ServerConfig
from instructloop.serving.engine import Engine
from instructloop.serving.server import InstructloopServer

USER_KEY = "test-user-key"
ADMIN_KEY = "test-admin-key"

RECONNECT_EVERY_SECOND = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
"""Channel options for polling a server that is still starting: with gRPC's default backoff
(x1.6 per failed attempt, up to 120 s) a channel opened while the engine starts tries again
long after the server is up."""


def make_test_config(
    model_dir: Path | str | None, redis_url: str, **overrides: object
) -> ServerConfig:
    base: dict[str, object] = {
        "model": None if model_dir is None else str(model_dir),
        "grpc_port": 0,
        "metrics_port": 0,
        "redis_url": redis_url,
        "cpu_kvcache_space_gib": 1,
        "max_model_len": 2048,
        "api_keys": (USER_KEY,),
        "admin_keys": (ADMIN_KEY,),
        "replica_id": "test-replica",
        "shutdown_grace_s": 2.0,
    }
    base.update(overrides)
    return ServerConfig(**base)  # type: ignore[arg-type]


@dataclass
class Served:
    """A running server and what a test needs to talk to it."""

    server: InstructloopServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine(self) -> Engine:
        return self.server.engine

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics.port}/metrics"

    @property
    def user_md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {USER_KEY}"),)

    @property
    def admin_md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {ADMIN_KEY}"),)


@contextlib.asynccontextmanager
async def running_server(
    model_dir: Path | str | None,
    redis_url: str,
    *,
    engine: Engine | None = None,
    **overrides: object,
) -> AsyncIterator[Served]:
    """A started InstructloopServer; pass `engine` to reuse a running engine (fast)."""
    server = InstructloopServer(make_test_config(model_dir, redis_url, **overrides), engine=engine)
    try:
        await server.start()
        yield Served(server)
    finally:
        await server.stop(grace=1.0)
