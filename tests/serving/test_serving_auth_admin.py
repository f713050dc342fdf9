"""Authentication (bearer keys), ModelService (admin), health, reflection and metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from instructloop.registry import ModelRegistry
from instructloop.v1 import completion_pb2, feedback_pb2, model_pb2
from tests.support.metrics import metric_value
from tests.support.redis_state import redis_state
from tests.support.rpc import chat, rpc_error, stubs
from tests.support.server import Served

pytestmark = pytest.mark.engine

HI = completion_pb2.CompletionRequest(prompt="Hi", max_tokens=2)


@pytest.mark.parametrize(
    "md",
    [
        (),
        (("authorization", "Bearer wrong-key"),),
        (("authorization", "test-user-key"),),  # no scheme
        (("authorization", "Basic test-user-key"),),
        (("authorization", "Bearer "),),
    ],
    ids=["missing", "wrong", "no-scheme", "basic", "empty"],
)
async def test_missing_or_wrong_key_is_unauthenticated(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis, md: tuple
) -> None:
    s = stubs(channel)
    before = redis_state(serving_redis)
    calls = [
        s.completion.Complete(HI, metadata=md),
        s.feedback.SubmitRating(feedback_pb2.SubmitRatingRequest(user_id="u"), metadata=md),
        s.model.GetServingModel(model_pb2.GetServingModelRequest(), metadata=md),
    ]
    for call in calls:
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in (err.details() or "")

    async def stream() -> None:
        async for _ in s.completion.StreamComplete(HI, metadata=md):
            pass

    err = await rpc_error(stream())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert redis_state(serving_redis) == before


async def test_user_key_cannot_call_model_service(
    served: Served, channel: grpc.aio.Channel
) -> None:
    s = stubs(channel)
    for call in (
        s.model.GetServingModel(model_pb2.GetServingModelRequest(), metadata=served.user_md),
        s.model.ListModels(model_pb2.ListModelsRequest(), metadata=served.user_md),
        s.model.PromoteModel(model_pb2.PromoteModelRequest(version="v1"), metadata=served.user_md),
    ):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in (err.details() or "")


async def test_admin_key_calls_everything(
    served: Served,
    channel: grpc.aio.Channel,
    serving_redis_url: str,
    serving_redis: redis.Redis,
    model_dir: Path,
) -> None:
    s = stubs(channel)
    md = served.admin_md
    resp = await s.completion.Complete(HI, metadata=md)
    assert resp.choices
    sm = await s.model.GetServingModel(model_pb2.GetServingModelRequest(), metadata=md)
    live = ModelRegistry(serving_redis_url).live()
    assert live is not None
    assert sm.model.version == served.engine.model_version == live.version == resp.model_version
    assert sm.live_version == live.version
    assert Path(sm.model.path) == model_dir.resolve()
    assert sm.model.source == "register"
    assert sm.serving_since.seconds > 0 and sm.replica_id == "test-replica"
    lm = await s.model.ListModels(model_pb2.ListModelsRequest(), metadata=md)
    assert lm.live_version == live.version
    assert [m.version for m in lm.models] == [m.version for m in ModelRegistry(
        serving_redis_url).list()]  # fmt: skip
    assert live.version in [m.version for m in lm.models]
    # Promoting the live version again is a no-op that answers OK; an unknown one changes nothing.
    before = redis_state(serving_redis)
    again = await s.model.PromoteModel(
        model_pb2.PromoteModelRequest(version=live.version), metadata=md
    )
    assert again.live_version == live.version == again.model.version
    err = await rpc_error(
        s.model.PromoteModel(model_pb2.PromoteModelRequest(version="v999"), metadata=md)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND and "v999" in (err.details() or "")
    err = await rpc_error(s.model.PromoteModel(model_pb2.PromoteModelRequest(), metadata=md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert redis_state(serving_redis) == before


async def test_health_and_reflection_need_no_key(served: Served, channel: grpc.aio.Channel) -> None:
    h = health_pb2_grpc.HealthStub(channel)
    for service in (
        "",
        "instructloop.v1.CompletionService",
        "instructloop.v1.FeedbackService",
        "instructloop.v1.ModelService",
    ):
        r = await h.Check(health_pb2.HealthCheckRequest(service=service))
        assert r.status == health_pb2.HealthCheckResponse.SERVING, service
    err = await rpc_error(h.Check(health_pb2.HealthCheckRequest(service="nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    # Reflection (what grpcurl uses). Its client library is sync: run it off the event loop
    # that serves the server in this process.
    def reflect() -> tuple[set[str], str]:
        with grpc.insecure_channel(served.address) as sync_ch:
            db = ProtoReflectionDescriptorDatabase(sync_ch)
            services = set(db.get_services())
            fd = db.FindFileContainingSymbol("instructloop.v1.CompletionService")
            return services, fd.package

    services, package = await asyncio.to_thread(reflect)
    assert {
        "instructloop.v1.CompletionService",
        "instructloop.v1.FeedbackService",
        "instructloop.v1.ModelService",
        "grpc.health.v1.Health",
    } <= services
    assert package == "instructloop.v1"


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels...}`; 0 if absent."""
    return metric_value(text, name, **labels) or 0.0


async def test_metrics_endpoint(served: Served, channel: grpc.aio.Channel) -> None:
    s = stubs(channel)
    before = _scrape(served.metrics_url)
    resp = await s.completion.Complete(
        chat(("user", "Say hi."), n=2, max_tokens=6), metadata=served.user_md
    )
    async for _ in s.completion.StreamComplete(HI, metadata=served.user_md):
        pass
    empty = completion_pb2.CompletionRequest()
    await rpc_error(s.completion.Complete(empty, metadata=served.user_md))
    await rpc_error(s.completion.Complete(HI))
    a, b = (c.response_id for c in resp.choices)
    await s.feedback.SubmitComparison(
        feedback_pb2.SubmitComparisonRequest(
            user_id="m", chosen_response_id=a, rejected_response_id=b
        ),
        metadata=served.user_md,
    )
    after = _scrape(served.metrics_url)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("instructloop_requests_total", rpc="Complete", code="OK") == 1
    assert delta("instructloop_requests_total", rpc="StreamComplete", code="OK") == 1
    assert delta("instructloop_requests_total", rpc="Complete", code="INVALID_ARGUMENT") == 1
    assert delta("instructloop_requests_total", rpc="Complete", code="UNAUTHENTICATED") == 1
    assert delta("instructloop_requests_total", rpc="SubmitComparison", code="OK") == 1
    assert delta("instructloop_request_duration_seconds_count", rpc="Complete") == 3
    gen = resp.usage.completion_tokens + 2  # the stream's max_tokens=2 ("Hi" never stops sooner)
    assert delta("instructloop_generation_tokens_total") >= gen - 1
    assert delta("instructloop_prompt_tokens_total") >= resp.usage.prompt_tokens + 1
    assert delta("instructloop_time_to_first_token_seconds_count") == 2
    assert delta("instructloop_inter_token_latency_seconds_count") > 0
    assert delta("instructloop_feedback_records_total", kind="comparison") == 1
    assert delta("instructloop_completions_logged_total") == 2
    assert _value(after, "instructloop_requests_in_flight", rpc="Complete") == 0
    assert _value(after, "instructloop_served_model_info", version=served.engine.model_version) == 1
    assert _value(after, "instructloop_engine_up") == 1
    for name in (
        "instructloop_redis_write_errors_total",
        "instructloop_engine_restarts_total",
        "instructloop_engine_running_requests",
        "instructloop_engine_kv_cache_usage_ratio",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in after, name

    # vLLM's own engine metrics on the same port, as `vllm serve` exposes them
    # (present, not compared: after the suite's hot swaps of this shared engine vLLM's own
    # counters are not this server's alone)
    assert "\nvllm:prompt_tokens_total{" in after
    assert "# TYPE vllm:num_requests_running gauge" in after
