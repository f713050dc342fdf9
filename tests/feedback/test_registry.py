"""The model registry on the real Redis: versions, idempotent registration, lineage, promote,
rollback, gate, events, and the async twin."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from safetensors.numpy import save_file

from instructloop.redis_server import free_port
from instructloop.registry import (
    AsyncModelRegistry,
    GateFailed,
    InvalidModelArgument,
    ModelPathError,
    ModelRegistry,
    NoPreviousVersion,
    RegistryUnavailable,
    UnknownVersion,
    fingerprint,
)
from tests.support.models import build_tiny_llama
from tests.support.redis_state import db_state

Checkpoint = Callable[[Path, int], Path]


@pytest.fixture(scope="module")
def tiny_template(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with the default model's tokenizer: a checkpoint the registry verifies."""
    return build_tiny_llama(tmp_path_factory.mktemp("registry") / "tiny", model_dir)


@pytest.fixture(scope="module")
def checkpoint(tiny_template: Path) -> Callable[[Path, int], Path]:
    """`checkpoint(path, seed)`: a valid checkpoint at `path` whose weights depend on `seed`
    (written over what is there)."""
    from safetensors.numpy import load_file

    def make(path: Path, seed: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        for f in tiny_template.iterdir():
            if f.name != "model.safetensors":
                shutil.copyfile(f, path / f.name)
        state = load_file(str(tiny_template / "model.safetensors"))
        norm = "model.norm.weight"
        rng = np.random.default_rng(seed)
        state[norm] = rng.standard_normal(state[norm].shape).astype(state[norm].dtype)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path

    return make


@pytest.fixture
def reg(redis_client: Any) -> ModelRegistry:
    return ModelRegistry(redis_client)


class Events:
    """Collects the registry's Pub/Sub messages in a thread."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)
        self.pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        self.messages: list[str] = []

    def drain(self, expect: int) -> list[str]:
        for _ in range(100):
            if len(self.messages) >= expect:
                break
            msg = self.pubsub.get_message(timeout=0.05)
            if msg and msg["type"] == "message":
                self.messages.append(msg["data"].decode())
        # nothing more than expected arrives
        msg = self.pubsub.get_message(timeout=0.2)
        if msg and msg["type"] == "message":
            self.messages.append(msg["data"].decode())
        return self.messages


def test_register_versions_and_idempotence(
    reg: ModelRegistry, tmp_path: Path, checkpoint: Checkpoint
) -> None:
    a = checkpoint(tmp_path / "a", 0)
    v1 = reg.register(a, source="init", metrics={"x": 0.1 + 0.2})
    assert v1.version == "v1"
    assert (v1.path, v1.parent, v1.source, v1.gate, v1.data_snapshot) == (
        str(a.resolve()), None, "init", None, None,
    )  # fmt: skip
    assert v1.metrics == {"x": 0.1 + 0.2}  # the exact float, not 0.3
    assert v1.fingerprint == fingerprint(a)
    # same directory, same content: the same version
    again = reg.register(str(a) + "/", source="register")
    assert again == v1
    # a copy elsewhere is another checkpoint; changed content is another version
    b = tmp_path / "b"
    shutil.copytree(a, b)
    v2 = reg.register(b, source="sft", parent="v1", data_snapshot="snap-1", gate="passed")
    checkpoint(a, 1)  # a's weights change in place
    v3 = reg.register(a, source="ppo", parent="v2")
    assert (v2.version, v3.version) == ("v2", "v3")
    assert v2.fingerprint == v1.fingerprint != v3.fingerprint
    assert (v2.parent, v2.data_snapshot, v2.gate) == ("v1", "snap-1", "passed")
    assert [m.version for m in reg.list()] == ["v3", "v2", "v1"]
    assert reg.get("v2") == v2
    assert reg.live() is None


def test_register_bad_input_changes_nothing(
    reg: ModelRegistry, redis_client: Any, tmp_path: Path, checkpoint: Checkpoint
) -> None:
    a = checkpoint(tmp_path / "a", 0)
    reg.register(a, source="init")
    before = db_state(redis_client)
    with pytest.raises(ModelPathError, match="does not exist"):
        reg.register(tmp_path / "missing", source="init")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="holds no"):
        reg.register(tmp_path / "empty", source="init")
    b = checkpoint(tmp_path / "b", 1)
    with pytest.raises(UnknownVersion, match="parent version v9"):
        reg.register(b, source="sft", parent="v9")
    with pytest.raises(InvalidModelArgument, match="gate"):
        reg.register(b, source="sft", gate="maybe")
    with pytest.raises(InvalidModelArgument, match="number"):
        reg.register(b, source="sft", metrics={"acc": "high"})  # type: ignore[dict-item]
    with pytest.raises(InvalidModelArgument, match="source"):
        reg.register(b, source="")
    with pytest.raises(UnknownVersion):
        reg.get("v2")
    assert db_state(redis_client) == before


def test_concurrent_registration_of_one_directory(
    redis_url: str, redis_client: Any, tmp_path: Path, checkpoint: Checkpoint
) -> None:
    a = checkpoint(tmp_path / "a", 0)
    barrier = threading.Barrier(8)

    def go(_: int) -> str:
        r = ModelRegistry(redis_url)
        barrier.wait()
        try:
            return r.register(a, source="init").version
        finally:
            r.close()

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(go, range(8)))
    assert versions == ["v1"] * 8
    assert redis_client.zcard("il:models:all") == 1


def test_promote_rollback_and_events(
    reg: ModelRegistry, redis_client: Any, tmp_path: Path, checkpoint: Checkpoint
) -> None:
    v1 = reg.register(checkpoint(tmp_path / "a", 0), source="init")
    v2 = reg.register(checkpoint(tmp_path / "b", 1), source="sft", parent="v1")
    v3 = reg.register(checkpoint(tmp_path / "c", 2), source="ppo", parent="v2")
    events = Events(redis_client, reg.events_channel)
    assert reg.events_channel == "il:models:events"

    assert reg.promote("v1") == v1
    first = reg.live_state()
    assert first is not None and first.model == v1
    assert reg.promote("v2") == v2
    assert reg.promote("v2") == v2  # already live: no change, no event
    assert reg.promote("v3") == v3
    assert reg.live() == v3 and reg.history() == ["v2", "v1"]
    second = reg.live_state()
    assert second is not None and second.since >= first.since

    assert reg.rollback() == v2
    assert reg.live() == v2 and reg.history() == ["v1"]
    assert reg.rollback() == v1
    assert reg.history() == []
    with pytest.raises(NoPreviousVersion):
        reg.rollback()
    assert reg.live() == v1
    assert events.drain(5) == ["v1", "v2", "v3", "v2", "v1"]


def test_promotion_guards(
    reg: ModelRegistry, redis_client: Any, tmp_path: Path, checkpoint: Checkpoint
) -> None:
    reg.register(checkpoint(tmp_path / "a", 0), source="init")
    reg.promote("v1")
    bad = reg.register(checkpoint(tmp_path / "b", 1), source="ppo", parent="v1")
    assert reg.set_gate(bad.version, "failed").gate == "failed"
    gone = reg.register(checkpoint(tmp_path / "c", 2), source="ppo", parent="v1")
    shutil.rmtree(tmp_path / "c")
    before = db_state(redis_client)
    with pytest.raises(GateFailed, match="failed its evaluation gate"):
        reg.promote(bad.version)
    with pytest.raises(ModelPathError):
        reg.promote(gone.version)
    with pytest.raises(UnknownVersion):
        reg.promote("v42")
    with pytest.raises(InvalidModelArgument):
        reg.set_gate("v1", "ok")
    assert db_state(redis_client) == before
    assert reg.live() is not None and reg.live().version == "v1"  # type: ignore[union-attr]
    # an operator may still force it
    reg.promote(bad.version, force=True)
    assert reg.live() == reg.get(bad.version)

    m = reg.update_metrics("v1", {"rm_accuracy": 0.724})
    m = reg.update_metrics("v1", {"win_rate": 0.73})
    assert m.metrics == {"rm_accuracy": 0.724, "win_rate": 0.73}
    assert reg.set_gate("v1", None).gate is None


def test_ensure_live_and_default_model(reg: ModelRegistry, model_dir: Path) -> None:
    live = reg.ensure_live(model_dir)
    assert (live.version, live.source, live.path) == ("v1", "init", str(model_dir.resolve()))
    assert reg.ensure_live(model_dir) == live
    assert reg.register(model_dir, source="init") == live


def test_registry_unavailable(tmp_path: Path, checkpoint: Checkpoint) -> None:
    down = ModelRegistry(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RegistryUnavailable):
        down.live()
    with pytest.raises(RegistryUnavailable):
        down.register(checkpoint(tmp_path / "a", 0), source="init")

    async def go() -> None:
        adown = AsyncModelRegistry(f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(RegistryUnavailable):
            await adown.list()
        await adown.close()

    asyncio.run(go())


async def test_async_registry(
    redis_client: Any, redis_url: str, tmp_path: Path, checkpoint: Checkpoint
) -> None:
    reg = AsyncModelRegistry(redis_url)
    sync = ModelRegistry(redis_client)
    try:
        v1 = await reg.register(checkpoint(tmp_path / "a", 0), source="init")
        v2 = await reg.register(checkpoint(tmp_path / "b", 1), source="sft", parent="v1",
                                metrics={"loss": 1.5})  # fmt: skip
        assert await reg.register(tmp_path / "a", source="init") == v1
        assert [m.version for m in await reg.list()] == ["v2", "v1"]
        assert await reg.get("v2") == sync.get("v2") == v2
        assert await reg.live() is None
        await reg.promote("v1")
        await reg.promote("v2")
        assert sync.live() == v2 and await reg.history() == ["v1"]
        assert await reg.rollback() == v1
        with pytest.raises(NoPreviousVersion):
            await reg.rollback()
        with pytest.raises(UnknownVersion):
            await reg.promote("v7")
        assert (await reg.update_metrics("v2", {"acc": 0.5})).metrics == {"loss": 1.5, "acc": 0.5}
        assert (await reg.set_gate("v2", "passed")).gate == "passed"
        state = await reg.live_state()
        assert state is not None and state.model == v1
    finally:
        await reg.close()
