"""Principals and their quotas over gRPC: a server on the session's engine whose keys belong to
named principals, with small per-minute limits. Over a limit is RESOURCE_EXHAUSTED with a retry
hint and a metric; a new user_id under the same key does not escape it; another principal is not
affected; records name the principal."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
import redis

from instructloop.feedback.keys import Keys
from instructloop.v1 import completion_pb2, feedback_pb2
from tests.feedback.test_feedback_principals import away_from_window_edge
from tests.support.metrics import metric_value
from tests.support.redis_state import stored_completion
from tests.support.rpc import rpc_error, stubs
from tests.support.server import Served, running_server

pytestmark = pytest.mark.engine

KEYS = {p: f"key-of-{p}" for p in ("alpha", "beta", "gamma", "delta")}
REQUESTS, TOKENS, FEEDBACK = 3, 6, 2


def md(principal: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[principal]}"),)


@pytest_asyncio.fixture(scope="module")
async def limited(served: Served, serving_redis_url: str) -> AsyncIterator[Served]:
    async with running_server(
        None,
        serving_redis_url,
        engine=served.engine,
        api_keys=tuple(f"{p}:{k}" for p, k in KEYS.items()),
        quota_completions_per_minute=REQUESTS,
        quota_tokens_per_minute=TOKENS,
        quota_feedback_per_minute=FEEDBACK,
    ) as s:
        # In the middle of this minute, always: the sliding windows' weights, and with them the
        # retry hints, are then fixed (the windows are still this minute's).
        now = time.time()
        pinned = now - now % 60 + 30
        s.server.quotas.clock = lambda: pinned
        yield s


@pytest_asyncio.fixture(scope="module")
async def limited_channel(limited: Served) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(limited.address) as ch:
        yield ch


def hi(user: str, **kw: object) -> completion_pb2.CompletionRequest:
    req = completion_pb2.CompletionRequest(prompt="Hi", max_tokens=1, user_id=user)
    for k, v in kw.items():
        setattr(req, k, v)
    return req


def metrics(s: Served) -> str:
    with urllib.request.urlopen(s.metrics_url, timeout=10) as r:
        return r.read().decode()


def retry_hint(err: grpc.aio.AioRpcError) -> int:
    trailing = dict(err.trailing_metadata() or ())
    assert int(trailing["grpc-retry-pushback-ms"]) == 1000 * int(trailing["retry-after"])
    return int(trailing["retry-after"])


async def test_completion_requests_per_principal(
    limited: Served, limited_channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(limited_channel)
    first = await s.completion.Complete(hi("user-0"), metadata=md("alpha"))
    for i in range(1, REQUESTS):
        await s.completion.Complete(hi(f"user-{i}"), metadata=md("alpha"))
    # Over the limit, whoever the user: the limit is the key's principal's.
    err = await rpc_error(s.completion.Complete(hi("a-new-user"), metadata=md("alpha")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"principal 'alpha' is over its quota of {REQUESTS} completion requests" in (
        err.details() or ""
    )
    # Half the minute is left, and the window's count alone reaches the limit: 30 s.
    assert retry_hint(err) == 30

    async def stream() -> None:
        async for _ in s.completion.StreamComplete(hi("another-user"), metadata=md("alpha")):
            pass

    err = await rpc_error(stream())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_hint(err) == 30
    # Another principal is not affected.
    other = await s.completion.Complete(hi("user-0"), metadata=md("beta"))
    assert other.choices
    text = metrics(limited)
    refusals = "instructloop_quota_refusals_total"
    assert metric_value(text, refusals, principal="alpha", kind="requests") == 2
    assert metric_value(text, refusals, principal="beta", kind="requests") is None
    code = grpc.StatusCode.RESOURCE_EXHAUSTED.name
    assert (metric_value(text, "instructloop_requests_total", rpc="Complete", code=code) or 0) >= 1
    # The record names the principal; user_id stays the client's label within it.
    rec = stored_completion(serving_redis, first.completion_id)
    assert rec is not None and (rec["principal"], rec["user_id"]) == ("alpha", "user-0")
    rec = stored_completion(serving_redis, other.completion_id)
    assert rec is not None and rec["principal"] == "beta"


async def test_generated_tokens_per_principal(
    limited: Served, limited_channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(limited_channel)
    used = 0
    story = completion_pb2.CompletionRequest(
        prompt="Once upon a time, in a land far away,", n=2, max_tokens=8, temperature=1.0
    )
    while used < TOKENS:  # admitted while under the limit; charged when each ends
        r = await s.completion.Complete(story, metadata=md("gamma"))
        used += r.usage.completion_tokens
        await limited.server.quotas.settle()
    key = Keys().quota("tokens", "gamma", int(limited.server.quotas.clock() // 60))
    assert int(serving_redis.get(key) or 0) == used
    err = await rpc_error(s.completion.Complete(hi("someone-else"), metadata=md("gamma")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over its quota of {TOKENS} generated tokens" in (err.details() or "")
    assert retry_hint(err) >= 30
    assert (
        metric_value(
            metrics(limited), "instructloop_quota_refusals_total", principal="gamma", kind="tokens"
        )
        == 1
    )


async def test_feedback_per_principal(limited: Served, limited_channel: grpc.aio.Channel) -> None:
    s = stubs(limited_channel)
    c = await s.completion.Complete(hi("x", n=2, temperature=1.0), metadata=md("delta"))
    rid = c.choices[0].response_id

    def thumbs(user: str) -> feedback_pb2.SubmitRatingRequest:
        return feedback_pb2.SubmitRatingRequest(
            user_id=user, idempotency_key="k", response_id=rid,
            scale=feedback_pb2.RATING_SCALE_THUMB, score=1,
        )  # fmt: skip

    away_from_window_edge()  # the store counts feedback in fixed windows of real time
    for i in range(FEEDBACK):
        await s.feedback.SubmitRating(thumbs(f"user-{i}"), metadata=md("delta"))
    err = await rpc_error(s.feedback.SubmitRating(thumbs("a-new-user"), metadata=md("delta")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"principal 'delta' has submitted {FEEDBACK} feedback records" in (err.details() or "")
    assert 1 <= retry_hint(err) <= 60
    ack = await s.feedback.SubmitRating(thumbs("user-0"), metadata=md("beta"))
    fb = await limited.server.store.get_feedback(ack.feedback_id)
    assert fb is not None and (fb.principal, fb.user_id) == ("beta", "user-0")
    text = metrics(limited)
    refusals = "instructloop_quota_refusals_total"
    assert metric_value(text, refusals, principal="delta", kind="feedback") == 1
