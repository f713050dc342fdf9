"""Client cancellation and deadlines abort the engine request (checked in the engine itself:
its scheduler stops stepping, and no request stays unfinished), and nothing is logged."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis

from instructloop.v1 import completion_pb2
from tests.support.redis_state import redis_state
from tests.support.rpc import rpc_error, stubs
from tests.support.server import Served

pytestmark = pytest.mark.engine

# Greedy counting goes on and on: the request is still running when it is cancelled.
LONG = completion_pb2.CompletionRequest(
    prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", max_tokens=1500, temperature=0.0
)


async def _engine_idle(served: Served, timeout: float = 20.0) -> None:
    """Wait until the engine has no unfinished request and its scheduler stopped stepping."""
    eng = served.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = eng.stats.steps
        await asyncio.sleep(1.0)
        if eng.num_unfinished_requests() == 0 and eng.stats.steps == steps:
            return
    raise AssertionError(
        f"engine still busy: unfinished={eng.num_unfinished_requests()} stats={eng.stats}"
    )


async def test_stream_cancel_aborts_engine_request(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    await _engine_idle(served)
    before = redis_state(serving_redis)
    aborted = served.engine.stats.aborted_requests
    steps0 = served.engine.stats.steps
    call = s.completion.StreamComplete(LONG, metadata=served.user_md)
    first = await call.read()
    assert first is not grpc.aio.EOF and first.choices
    assert served.engine.num_unfinished_requests() == 1, first
    call.cancel()
    await _engine_idle(served)
    assert served.engine.stats.aborted_requests == aborted + 1
    # 1500 tokens would take far more steps than were run before the abort took effect.
    assert served.engine.stats.steps - steps0 < 1000
    assert redis_state(serving_redis) == before


async def test_unary_cancel_aborts_engine_request(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    await _engine_idle(served)
    before = redis_state(serving_redis)
    aborted = served.engine.stats.aborted_requests
    call = s.completion.Complete(LONG, metadata=served.user_md)
    t0 = time.monotonic()
    while served.engine.stats.steps == 0 or served.engine.num_unfinished_requests() == 0:
        assert time.monotonic() - t0 < 30, "the request never reached the engine"
        await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await _engine_idle(served)
    assert served.engine.stats.aborted_requests == aborted + 1
    assert redis_state(serving_redis) == before


@pytest.mark.parametrize("rpc", ["Complete", "StreamComplete"])
async def test_deadline_aborts_engine_request(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis, rpc: str
) -> None:
    s = stubs(channel)
    await _engine_idle(served)
    before = redis_state(serving_redis)
    aborted = served.engine.stats.aborted_requests
    if rpc == "Complete":
        err = await rpc_error(s.completion.Complete(LONG, metadata=served.user_md, timeout=3))
    else:

        async def drain() -> None:
            async for _ in s.completion.StreamComplete(LONG, metadata=served.user_md, timeout=3):
                pass

        err = await rpc_error(drain())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _engine_idle(served)
    assert served.engine.stats.aborted_requests == aborted + 1
    assert redis_state(serving_redis) == before
