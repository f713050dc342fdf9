"""Redis faults, with a private redis-server (AOF, appendfsync always) under a second server on
the session's engine: Redis down -> UNAVAILABLE and nothing returned as OK; the server recovers
by itself; and a Redis crash in the middle of a stream of feedback writes loses no
acknowledged record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis

from instructloop.redis_server import RedisProcess
from instructloop.v1 import completion_pb2, feedback_pb2
from tests.support.rpc import rpc_error, stubs
from tests.support.server import Served, running_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
HI = completion_pb2.CompletionRequest(prompt="Hello", n=2, max_tokens=3, user_id="u")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    proc = RedisProcess(dir=tmp_path / "redis", appendfsync="always").start()
    try:
        yield proc
    finally:
        proc.stop(kill=True)


@pytest_asyncio.fixture
async def side_server(served: Served, private_redis: RedisProcess) -> AsyncIterator[Served]:
    async with running_server(
        None, private_redis.url, engine=served.engine, feedback_rate_limit_per_minute=0
    ) as s:
        yield s


def _restart(proc: RedisProcess, down_s: float = 0.0) -> None:
    port = proc.port
    proc.stop(kill=True)  # SIGKILL: no shutdown save, only what AOF fsynced survives
    # Down for longer than the store's own reconnect retries, so some writes fail.
    time.sleep(down_s)
    proc.port = port
    proc.start()


async def test_redis_down_unavailable_then_recovers(
    side_server: Served, private_redis: RedisProcess
) -> None:
    md = side_server.user_md
    async with grpc.aio.insecure_channel(side_server.address) as ch:
        s = stubs(ch)
        ok = await s.completion.Complete(HI, metadata=md)
        a, b = (c.response_id for c in ok.choices)
        port = private_redis.port
        private_redis.stop(kill=True)

        err = await rpc_error(s.completion.Complete(HI, metadata=md))
        assert err.code() == UNAVAILABLE and "not returned" in (err.details() or "")

        chunks: list[completion_pb2.CompletionChunk] = []

        async def stream() -> None:
            async for c in s.completion.StreamComplete(HI, metadata=md):
                chunks.append(c)

        err = await rpc_error(stream())
        assert err.code() == UNAVAILABLE
        assert not any(c.HasField("usage") for c in chunks), "final chunk sent without a log"
        lost_ids = {d.response_id for c in chunks for d in c.choices}

        cmp_req = feedback_pb2.SubmitComparisonRequest(
            user_id="u", idempotency_key="down-1", chosen_response_id=a, rejected_response_id=b
        )
        err = await rpc_error(s.feedback.SubmitComparison(cmp_req, metadata=md))
        assert err.code() == UNAVAILABLE

        # disable_logging needs no Redis: still served.
        free = await s.completion.Complete(
            completion_pb2.CompletionRequest(prompt="Hello", max_tokens=2, disable_logging=True),
            metadata=md,
        )
        assert not free.logged

        private_redis.port = port
        private_redis.start()
        again = await s.completion.Complete(HI, metadata=md)
        assert again.logged
        ack = await s.feedback.SubmitComparison(cmp_req, metadata=md)
        assert not ack.duplicate  # the attempt while Redis was down stored nothing

    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        assert client.hget(f"il:cmpl:{again.completion_id}", "record")
        assert client.hgetall(f"il:fb:{ack.feedback_id}")
        for rid in lost_ids:
            assert client.get(f"il:resp:{rid}") is None
        assert int(client.hget("il:stats", "completions")) == 2
    finally:
        client.close()
    text = await asyncio.to_thread(_scrape, side_server.metrics_url)
    assert 'instructloop_redis_write_errors_total{op="log_completion"} 2.0' in text
    assert 'instructloop_redis_write_errors_total{op="submit_comparison"} 1.0' in text


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


async def test_redis_crash_during_feedback_stream_loses_no_ack(
    side_server: Served, private_redis: RedisProcess
) -> None:
    md = side_server.user_md
    async with grpc.aio.insecure_channel(side_server.address) as ch:
        s = stubs(ch)
        c = await s.completion.Complete(HI, metadata=md)
        rid = c.choices[0].response_id
        acked: dict[str, tuple[str, str]] = {}  # feedback_id -> (user, key)
        unavailable = 0
        stop_at = time.monotonic() + 6.0

        async def writer(w: int) -> None:
            nonlocal unavailable
            i = 0
            retrying = False
            # Keep retrying a failed key even past the end: every stored record gets its ack.
            while time.monotonic() < stop_at or retrying:
                key = f"w{w}-{i}"
                req = feedback_pb2.SubmitRatingRequest(
                    user_id=f"user-{w}", idempotency_key=key, response_id=rid,
                    scale=feedback_pb2.RATING_SCALE_LIKERT_7, score=1 + (i % 7),
                )  # fmt: skip
                try:
                    ack = await s.feedback.SubmitRating(req, metadata=md, timeout=10)
                except grpc.aio.AioRpcError as e:
                    assert e.code() == UNAVAILABLE, e
                    unavailable += 1
                    retrying = True
                    await asyncio.sleep(0.05)
                    continue  # retry the same key: counted once if it had landed
                retrying = False
                acked[ack.feedback_id] = (f"user-{w}", key)
                i += 1

        writers = [asyncio.create_task(writer(w)) for w in range(8)]
        await asyncio.sleep(1.5)
        n_before = len(acked)
        await asyncio.to_thread(_restart, private_redis, 1.0)
        await asyncio.gather(*writers)

    assert n_before > 0 and len(acked) > n_before, (n_before, len(acked))
    assert unavailable > 0, "the crash never hit a write; the test proved nothing"
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        missing = [f for f in acked if not client.exists(f"il:fb:{f}")]
        assert not missing, f"{len(missing)} acknowledged records lost: {missing[:3]}"
        for fid, (user, _key) in acked.items():
            assert client.hget(f"il:fb:{fid}", "user_id") == user
        # Each (user, key) was acknowledged under one id, and counted once.
        assert len(set(acked.values())) == len(acked)
        assert int(client.hget("il:stats", "feedback:rating")) == len(acked)
    finally:
        client.close()
