"""Session fixtures of the serving tests: ONE real vLLM engine for the whole session.

`served` is an InstructloopServer (grpc.aio, in this process, ephemeral ports) on the real
engine (VLLM_CPU_KVCACHE_SPACE=1 GiB, max_model_len 2048) and real Redis. Its Redis database
is `serving_redis_url`: the test Redis with database index 14, not 15, because other test
packages flush database 15 around their tests and would wipe the registry entry of the
session's model. Tests that need other settings (rate limit, TLS, a private Redis) start a
second server on the same engine (`running_server(..., engine=served.engine)`), which takes
a moment instead of a new engine start.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis

from tests.support.redis_state import flushed_client
from tests.support.server import Served, running_server

SERVING_DB = 14


@pytest.fixture(scope="session")
def serving_redis_url(redis_url: str) -> str:
    env = os.environ.get("INSTRUCTLOOP_TEST_SERVING_REDIS_URL")
    if env:
        return env
    return redis_url.rsplit("/", 1)[0] + f"/{SERVING_DB}"


@pytest.fixture(scope="session")
def serving_redis(serving_redis_url: str) -> Iterator[redis.Redis]:
    """A sync client on the serving database; flushed at session start and end."""
    with flushed_client(serving_redis_url, decode_responses=True) as client:
        yield client


@pytest_asyncio.fixture(scope="session")
async def served(
    model_dir: Path, serving_redis_url: str, serving_redis: redis.Redis
) -> AsyncIterator[Served]:
    async with running_server(model_dir, serving_redis_url) as s:
        yield s


@pytest_asyncio.fixture(scope="session")
async def channel(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(served.address)
    try:
        yield ch
    finally:
        await ch.close()
