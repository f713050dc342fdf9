"""A bad promotion no longer takes the service down, and no replica diverges silently.

- A replica that starts (no --model) while the live version will not load serves the newest
  version that does: it does not exit; its log, GetServingModel, its replica report and
  `instructloop_serving_fallback` say so; its hot swapper keeps trying the live version; the
  fallback ends once it serves the live version (here: two rollbacks).
- A pinned replica (--model) exports `instructloop_replica_pinned`, and after a promotion it
  does not follow, `instructloop_replica_behind_live` and GetServingModel show the divergence.
- PromoteModel refuses a version that was not verified when registered, unless `force`.

Real parts: the vLLM engine, Redis, gRPC. The pinned case shares the session's engine; the
fallback case needs its own engine start (slow).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructloop.registry import ModelRegistry
from instructloop.v1 import completion_pb2, model_pb2
from tests.support.checkpoints import broken_checkpoint
from tests.support.metrics import metric_value
from tests.support.models import build_tiny_llama
from tests.support.redis_state import db_state
from tests.support.rpc import rpc_error, stubs
from tests.support.server import Served, running_server

pytestmark = pytest.mark.engine


def metric(s: Served, name: str) -> float | None:
    with urllib.request.urlopen(s.metrics_url, timeout=10) as r:
        return metric_value(r.read().decode(), name)


async def until(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def serving(s: Served) -> model_pb2.ServingModel:
    async with grpc.aio.insecure_channel(s.address) as ch:
        return await stubs(ch).model.GetServingModel(
            model_pb2.GetServingModelRequest(), metadata=s.admin_md
        )


async def test_a_pinned_replica_says_so_and_shows_divergence(
    served: Served, redis_client: Any, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    reg = ModelRegistry(redis_client)
    # Its own registry (the test database) on the session's engine, pinned by --model.
    async with running_server(
        model_dir, redis_url, engine=served.engine, replica_id="pinned", swap_poll_s=0.2
    ) as s:
        v1 = s.server.model.version
        assert reg.live() is not None and reg.live().version == v1  # type: ignore[union-attr]
        assert metric(s, "instructloop_replica_pinned") == 1
        assert metric(s, "instructloop_serving_fallback") == 0
        sm = await serving(s)
        assert sm.pinned and sm.model.version == sm.live_version == v1
        assert sm.model.verified == "static" and sm.fallback_reason == ""

        v2 = reg.register(build_tiny_llama(tmp_path / "tiny", model_dir), source="test").version
        bad = broken_checkpoint(model_dir, tmp_path / "truncated", "truncated")
        v3 = reg.register(bad, source="test", verify=None).version
        async with grpc.aio.insecure_channel(s.address) as ch:
            m = stubs(ch).model
            req = model_pb2.PromoteModelRequest
            # Not verified: refused, nothing changes; an operator's force overrides.
            before = db_state(redis_client)
            err = await rpc_error(m.PromoteModel(req(version=v3), metadata=s.admin_md))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "not verified" in (err.details() or "")
            assert db_state(redis_client) == before
            listed = await m.ListModels(model_pb2.ListModelsRequest(), metadata=s.admin_md)
            assert {x.version: x.verified for x in listed.models} == {
                v1: "static", v2: "static", v3: ""
            }  # fmt: skip

            sm = await m.PromoteModel(req(version=v2), metadata=s.admin_md)
            assert sm.live_version == v2 and sm.model.version == v1 and sm.pinned
            await until(lambda: metric(s, "instructloop_replica_behind_live") == 1, "divergence")
            sm = await serving(s)
            assert (sm.model.version, sm.live_version) == (v1, v2)
            await until(lambda: any(r.get("pinned") for r in reg.replicas()), "the replica report")

            sm = await m.PromoteModel(req(version=v3, force=True), metadata=s.admin_md)
            assert sm.live_version == v3 and s.server.model.version == v1  # pinned: no swap
            await m.PromoteModel(req(version=v1), metadata=s.admin_md)
            await until(lambda: metric(s, "instructloop_replica_behind_live") == 0, "back")
        assert metric(s, "instructloop_swaps_total") is None  # a pinned replica has no swapper


@pytest.mark.slow
async def test_a_replica_starting_on_a_broken_live_version_serves_one_that_loads(
    redis_client: Any,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Live v3 is truncated (forced past verification); v2 passes the file checks but names an
    architecture the engine does not know; v1 is the default model. A replica started now
    serves v1, and returns to the live version once it is one that loads."""
    reg = ModelRegistry(redis_client)
    v1 = reg.ensure_live(model_dir).version
    unknown_arch = Path(shutil.copytree(model_dir, tmp_path / "unknown_arch"))
    cfg = json.loads((unknown_arch / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (unknown_arch / "config.json").write_text(json.dumps(cfg))
    v2 = reg.register(unknown_arch, source="test").version
    reg.promote(v2)
    truncated = broken_checkpoint(model_dir, tmp_path / "truncated", "truncated")
    v3 = reg.register(truncated, source="test", verify=None).version
    reg.promote(v3, force=True)
    assert reg.history() == [v2, v1]

    caplog.set_level(logging.ERROR, logger="instructloop.serving")
    async with running_server(
        None, redis_url, replica_id="fallback", swap_poll_s=0.5, swap_retry_s=3600.0
    ) as s:
        # It did not exit: it serves v1, and says why not v3 everywhere.
        assert s.engine.model_version == v1 and s.server.model.version == v1
        log = caplog.text
        assert f"the live version {v3} will not load" in log and "FALLBACK" in log
        assert f"model {v2}" in log and "the engine did not start on it" in log
        sm = await serving(s)
        assert (sm.model.version, sm.live_version, sm.pinned) == (v1, v3, False)
        assert "truncated" in sm.fallback_reason and str(truncated) in sm.fallback_reason
        assert metric(s, "instructloop_serving_fallback") == 1
        assert metric(s, "instructloop_replica_pinned") == 0
        async with grpc.aio.insecure_channel(s.address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            resp = await stubs(ch).completion.Complete(
                completion_pb2.CompletionRequest(prompt="Hello", max_tokens=3),
                metadata=s.user_md,
            )
            assert resp.model_version == v1
        # The swapper tries the live version and fails without disturbing anything.
        await until(lambda: metric(s, "instructloop_swap_failed") == 1, "the swap failure")
        assert metric(s, "instructloop_replica_behind_live") == 1
        await until(
            lambda: any(r.get("fallback") for r in reg.replicas()), "the replica report", 15
        )

        # Rolled back to v2, which does not load either: still on the fallback.
        reg.rollback()
        swapper = s.server.swapper
        assert swapper is not None
        await until(lambda: swapper.failure is not None and swapper.failure.version == v2, "v2")
        assert s.server.model.version == v1 and metric(s, "instructloop_serving_fallback") == 1
        # Rolled back to v1, the version it serves: the fallback is over.
        reg.rollback()
        await until(lambda: metric(s, "instructloop_serving_fallback") == 0, "the fallback's end")
        await until(lambda: metric(s, "instructloop_swap_failed") == 0, "the swap alert's end")
        sm = await serving(s)
        assert sm.model.version == sm.live_version == v1 and sm.fallback_reason == ""
        assert metric(s, "instructloop_replica_behind_live") == 0
