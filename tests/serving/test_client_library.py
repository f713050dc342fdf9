"""The light client (client/, `instructloop_client`) against the real server: completions,
streams and every kind of feedback, sync and async; TLS with a CA file; and retries that reuse
the idempotency key, so a ranking retried across a Redis restart, or whose first answer was
lost, is recorded exactly once.

The sync Client blocks, and the server runs on this test's event loop: its calls go through
asyncio.to_thread."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis
from instructloop_client import (
    NO_RETRY,
    AsyncClient,
    Client,
    Completion,
    FeedbackAck,
    RetryPolicy,
)

from instructloop.redis_server import RedisProcess
from tests.support.redis_tls import make_ca_and_server_cert
from tests.support.server import USER_KEY, Served, running_server

pytestmark = pytest.mark.engine

SHORT = {"n": 3, "max_tokens": 4, "temperature": 1.0}


def _stored(r: redis.Redis, ack: FeedbackAck) -> dict[str, str]:
    rec = r.hgetall(f"il:fb:{ack.feedback_id}")
    assert rec, f"feedback {ack.feedback_id} acknowledged but not stored"
    return rec  # type: ignore[no-any-return]


def _sync_round_trip(address: str) -> tuple[Completion, list[FeedbackAck], Completion]:
    with Client(address, USER_KEY, user_id="alice") as client:
        c = client.complete([{"role": "user", "content": "Name a fruit."}], **SHORT)
        acks = [
            client.rank(c, [2, 0, 1]),
            client.compare(c.choices[0], c.choices[1]),
            client.rate(c.choices[2], -1, scale="thumb"),
        ]
        with client.stream("Once upon a time", n=2, max_tokens=6) as stream:
            chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].logged
        streamed = stream.completion()
        acks.append(client.rank(streamed, [1, 0]))
        return c, acks, streamed


async def test_sync_client_round_trip(served: Served, serving_redis: redis.Redis) -> None:
    c, acks, streamed = await asyncio.to_thread(_sync_round_trip, served.address)
    assert len(c.choices) == 3 and c.logged and c.model_version
    assert [ch.index for ch in streamed.choices] == [0, 1]
    assert all(ch.text and ch.finish_reason for ch in streamed.choices)
    assert not any(a.duplicate for a in acks)
    ranking = _stored(serving_redis, acks[0])
    assert ranking["user_id"] == "alice" and ranking["completion_id"] == c.completion_id
    assert _stored(serving_redis, acks[1])["kind"] == "comparison"
    assert _stored(serving_redis, acks[2])["kind"] == "rating"
    assert _stored(serving_redis, acks[3])["completion_id"] == streamed.completion_id


async def test_async_client_round_trip(served: Served, serving_redis: redis.Redis) -> None:
    async with AsyncClient(served.address, USER_KEY, user_id="bob") as client:
        c = await client.complete("The capital of France is", **SHORT)
        by_id = await client.rank(c.completion_id, [c.choices[1].response_id, c.choices[0]])
        tied = {"idempotency_key": "mine-1", "ranks": [1, 1, 2], "user_id": "carol"}
        again = await client.rank(c, [0, 1, 2], **tied)  # type: ignore[arg-type]
        replay = await client.rank(c, [0, 1, 2], **tied)  # type: ignore[arg-type]
        rated = await client.rate(c.choices[0], 6, scale="likert7")
        stream = client.stream("Hello", max_tokens=4)
        n_chunks = 0
        async for _chunk in stream:
            n_chunks += 1
        assert n_chunks >= 2 and stream.completion().choices[0].finish_reason
        # Errors are the server's own gRPC status, not retried.
        with pytest.raises(grpc.RpcError) as bad:
            await client.rank(c, [0, 0])
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (by_id.duplicate, again.duplicate, replay.duplicate) == (False, False, True)
    assert replay.feedback_id == again.feedback_id  # the caller's key: one record
    assert _stored(serving_redis, by_id)["user_id"] == "bob"
    assert _stored(serving_redis, again)["user_id"] == "carol"
    assert _stored(serving_redis, rated)["kind"] == "rating"


async def test_tls_with_a_ca_file(served: Served, serving_redis_url: str, tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    async with running_server(
        None, serving_redis_url, engine=served.engine, tls_cert=cert, tls_key=key
    ) as tls:
        address = f"localhost:{tls.server.port}"

        def calls() -> tuple[Completion, grpc.StatusCode]:
            with Client(address, USER_KEY, tls=ca) as client:
                c = client.complete("Hello", max_tokens=2)
            # The system's roots do not hold the test CA: refused (and not retried for long).
            with Client(address, USER_KEY, tls=True, retry=NO_RETRY) as untrusting:
                try:
                    untrusting.complete("Hello", max_tokens=2, timeout_s=10)
                except grpc.RpcError as e:
                    return c, e.code()
            raise AssertionError("a server the client does not trust answered")

        c, refused = await asyncio.to_thread(calls)
        assert c.logged and refused == grpc.StatusCode.UNAVAILABLE
        async with AsyncClient(address, USER_KEY, tls=ca.read_bytes()) as aclient:
            assert (await aclient.complete("Hello", max_tokens=2)).logged


# -- retries that record once ----------------------------------------------------------------


@dataclass(frozen=True)
class Watched(RetryPolicy):
    """The default policy, with a record of the failures it was asked about."""

    seen: list[grpc.StatusCode] = field(default_factory=list)

    def should_retry(self, err: grpc.RpcError, attempt: int, *, idempotent: bool) -> bool:
        self.seen.append(err.code())  # type: ignore[attr-defined]
        return super().should_retry(err, attempt, idempotent=idempotent)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    proc = RedisProcess(dir=tmp_path / "redis", appendfsync="always").start()
    try:
        yield proc
    finally:
        if proc.proc is not None:
            os.kill(proc.proc.pid, signal.SIGCONT)  # in case a test left it stopped
        proc.stop(kill=True)


@pytest_asyncio.fixture
async def side_server(served: Served, private_redis: RedisProcess) -> AsyncIterator[Served]:
    async with running_server(
        None, private_redis.url, engine=served.engine, feedback_rate_limit_per_minute=0
    ) as s:
        yield s


def _rankings(url: str) -> tuple[int, int]:
    """(entries in the feedback log, feedback records) of the private Redis."""
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return r.xlen("il:log:feedback"), len(list(r.scan_iter("il:fb:*")))
    finally:
        r.close()


async def test_a_ranking_retried_across_a_redis_restart_is_recorded_once(
    side_server: Served, private_redis: RedisProcess
) -> None:
    policy = Watched()

    def scenario() -> FeedbackAck:
        with Client(side_server.address, USER_KEY, user_id="dave", retry=policy) as client:
            c = client.complete("Hello", **SHORT)
            port = private_redis.port
            private_redis.stop(kill=True)  # SIGKILL: only what AOF fsynced survives

            def restart() -> None:
                time.sleep(1.5)
                private_redis.port = port
                private_redis.start()

            back = threading.Thread(target=restart)
            back.start()
            try:
                return client.rank(c, [1, 2, 0])  # fails while Redis is down, then retries
            finally:
                back.join()

    ack = await asyncio.to_thread(scenario)
    assert grpc.StatusCode.UNAVAILABLE in policy.seen, "Redis was never down for the ranking"
    assert not ack.duplicate
    assert _rankings(private_redis.url) == (1, 1)


async def test_a_ranking_whose_answer_was_lost_is_recorded_once(
    side_server: Served, private_redis: RedisProcess
) -> None:
    """Redis stalls (SIGSTOP) with the first try's write sent: the client's deadline passes,
    it tries again with the same key; when Redis resumes the first write lands and the second
    is recognised as the same judgement. One record, acknowledged as new."""
    policy = Watched()
    assert private_redis.proc is not None
    pid = private_redis.proc.pid

    def scenario() -> FeedbackAck:
        with Client(side_server.address, USER_KEY, user_id="erin", retry=policy) as client:
            c = client.complete("Hello", **SHORT)
            os.kill(pid, signal.SIGSTOP)
            resume = threading.Timer(2.5, os.kill, (pid, signal.SIGCONT))
            resume.start()
            try:
                return client.rank(c, [0, 1, 2], timeout_s=1.0)
            finally:
                resume.join()

    ack = await asyncio.to_thread(scenario)
    assert grpc.StatusCode.DEADLINE_EXCEEDED in policy.seen, policy.seen
    assert not ack.duplicate  # the earlier try was the client's own
    assert _rankings(private_redis.url) == (1, 1)
