"""Fixtures of the training-loop tests (their helpers are in tests/support/)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import build_tiny_llama
from tests.support.worker import WorkerProc


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the default model's tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "policy", model_dir)


@pytest.fixture
def live_v1(redis_client: object, redis_url: str, tiny_policy: Path) -> str:
    """The tiny policy registered and live (flushed Redis)."""
    from instructloop.registry import ModelRegistry

    reg = ModelRegistry(redis_url)
    try:
        return reg.ensure_live(tiny_policy, source="init").version
    finally:
        reg.close()


@pytest.fixture
def worker_factory(tmp_path: Path, redis_url: str) -> Iterator[object]:
    """Start real `instructloop worker` processes; all are stopped at the end."""
    started: list[WorkerProc] = []

    def start(pool: str = "prefork", cpus: set[int] | None = None) -> WorkerProc:
        w = WorkerProc(redis_url, tmp_path / f"worker-{len(started)}.log", pool=pool, cpus=cpus)
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()
