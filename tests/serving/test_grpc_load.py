"""benchmarks/grpc_load.py, the feedback benchmark's own HTTP/2 gRPC client, against the real
server: what it reports (acks, status codes, messages) must be what grpc.aio's client reports
for the same calls, or the benchmark would count something other than acknowledged feedback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from benchmarks.grpc_load import Connection, GrpcError
from instructloop.feedback.keys import Keys
from instructloop.v1 import completion_pb2, feedback_pb2
from tests.support.rpc import small_completion, stubs
from tests.support.server import Served

pytestmark = pytest.mark.engine

SUBMIT_RANKING = "/instructloop.v1.FeedbackService/SubmitRanking"


async def _open(served: Served) -> Connection:
    host, port = served.address.rsplit(":", 1)
    return await Connection.open(host, int(port))


async def test_an_ack_is_the_ack_grpc_aio_gets(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    c = await small_completion(served, channel)
    ids = [ch.response_id for ch in c.choices]
    req = feedback_pb2.SubmitRankingRequest(
        user_id="lean-user", idempotency_key="lean-1", completion_id=c.completion_id,
        ranked_response_ids=[ids[2], ids[0], ids[1]],
    )  # fmt: skip
    conn = await _open(served)
    try:
        ack = feedback_pb2.FeedbackAck.FromString(
            await conn.unary(SUBMIT_RANKING, req.SerializeToString(), served.user_md)
        )
    finally:
        conn.close()
    assert ack.feedback_id.startswith("fb-") and not ack.duplicate
    stored = serving_redis.hgetall(Keys().feedback(ack.feedback_id))
    assert stored, "the acknowledged ranking is not in Redis"
    assert c.completion_id in str(stored)
    # The same judgement again through grpc.aio: the first ack, marked duplicate.
    again = await stubs(channel).feedback.SubmitRanking(req, metadata=served.user_md)
    assert again.feedback_id == ack.feedback_id and again.duplicate


async def test_errors_are_the_status_grpc_aio_gets(
    served: Served, channel: grpc.aio.Channel
) -> None:
    c = await small_completion(served, channel)
    a, b, _ = (ch.response_id for ch in c.choices)
    ranking = feedback_pb2.SubmitRankingRequest
    cases = [
        # (what, method, request, metadata)
        ("no key", SUBMIT_RANKING,
         ranking(user_id="u", completion_id=c.completion_id, ranked_response_ids=[a, b]), ()),
        ("duplicate ids", SUBMIT_RANKING,
         ranking(user_id="u", completion_id=c.completion_id, ranked_response_ids=[a, a]),
         served.user_md),
        ("unknown completion", SUBMIT_RANKING,
         ranking(user_id="u", completion_id="cmpl-nope", ranked_response_ids=[a, b]),
         served.user_md),
        ("unknown method", "/instructloop.v1.FeedbackService/Nope",
         ranking(user_id="u"), served.user_md),
    ]  # fmt: skip
    conn = await _open(served)
    try:
        for what, method, req, md in cases:
            with pytest.raises(GrpcError) as lean:
                await conn.unary(method, req.SerializeToString(), md)
            call = channel.unary_unary(
                method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=feedback_pb2.FeedbackAck.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as aio:
                await call(req, metadata=md)
            assert lean.value.code == aio.value.code().value[0], what
            assert lean.value.code_name == aio.value.code().name, what
            assert lean.value.message == aio.value.details(), what
            assert lean.value.code != 0
    finally:
        conn.close()


async def test_many_concurrent_calls_on_one_connection(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    """600 calls at once on one connection (more bytes than HTTP/2's default window; the
    server grants 4 MiB, the client's waiting for a window is tested in
    tests/test_grpc_load_protocol.py): every call gets its own ack, and each is stored."""
    c = await small_completion(served, channel)
    ids = [ch.response_id for ch in c.choices]
    reqs = [
        feedback_pb2.SubmitRankingRequest(
            user_id=f"lean-{i}", idempotency_key=f"k{i}", completion_id=c.completion_id,
            ranked_response_ids=ids[i % 3 :] + ids[: i % 3],
        ).SerializeToString()
        for i in range(600)
    ]  # fmt: skip
    conn = await _open(served)
    try:
        replies = await asyncio.gather(
            *(conn.unary(SUBMIT_RANKING, r, served.user_md) for r in reqs)
        )
    finally:
        conn.close()
    acks = [feedback_pb2.FeedbackAck.FromString(r) for r in replies]
    fids = {a.feedback_id for a in acks}
    assert len(fids) == 600 and not any(a.duplicate for a in acks)
    assert serving_redis.exists(*(Keys().feedback(f) for f in fids)) == 600


async def test_a_closed_connection_fails_its_calls(served: Served) -> None:
    conn = await _open(served)
    conn.close()
    await asyncio.sleep(0.1)
    with pytest.raises(GrpcError) as e:
        await conn.unary(SUBMIT_RANKING, b"", served.user_md)
    assert e.value.code_name == "UNAVAILABLE"


STREAM_COMPLETE = "/instructloop.v1.CompletionService/StreamComplete"


async def test_a_stream_is_the_stream_grpc_aio_gets(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """The serving benchmark's streams: the same chunks, in the same order, as grpc.aio's client
    gets for the same greedy request (ids aside: each call is a new completion)."""
    req = completion_pb2.CompletionRequest(
        prompt="The capital of France is", max_tokens=12, temperature=0.0, user_id="lean",
        disable_logging=True,
    )  # fmt: skip
    conn = await _open(served)
    try:
        lean = [
            completion_pb2.CompletionChunk.FromString(raw)
            async for raw in conn.stream(STREAM_COMPLETE, req.SerializeToString(), served.user_md)
        ]
    finally:
        conn.close()
    aio = [c async for c in stubs(channel).completion.StreamComplete(req, metadata=served.user_md)]

    def shape(chunks: list[completion_pb2.CompletionChunk]) -> list[object]:
        return [
            ([(d.index, d.text, d.finish_reason, d.completion_tokens) for d in c.choices],
             c.usage.completion_tokens, c.model_version)
            for c in chunks
        ]  # fmt: skip

    assert len(lean) > 2 and lean[-1].usage.completion_tokens == 12
    assert "".join(d.text for c in lean for d in c.choices)
    assert shape(lean) == shape(aio)
    assert len({c.completion_id for c in lean}) == 1


async def test_a_failed_stream_and_a_left_stream(served: Served) -> None:
    """A stream refused up front raises the server's status; one left after its first chunk
    is cancelled, and the server aborts its engine request."""
    conn = await _open(served)
    try:
        bad = completion_pb2.CompletionRequest(prompt="", user_id="lean")
        with pytest.raises(GrpcError) as e:
            async for _ in conn.stream(STREAM_COMPLETE, bad.SerializeToString(), served.user_md):
                pass
        assert e.value.code_name == "INVALID_ARGUMENT" and "prompt" in e.value.message
        aborted = served.engine.stats.aborted_requests
        long = completion_pb2.CompletionRequest(
            prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", max_tokens=1500, temperature=0.0,
            user_id="lean", disable_logging=True,
        )  # fmt: skip
        chunks = conn.stream(STREAM_COMPLETE, long.SerializeToString(), served.user_md)
        async for raw in chunks:
            if completion_pb2.CompletionChunk.FromString(raw).choices:
                break
        assert served.engine.num_unfinished_requests() == 1
        await chunks.aclose()
        for _ in range(200):
            if served.engine.num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.1)
        assert served.engine.num_unfinished_requests() == 0, "the left stream still runs"
        assert served.engine.stats.aborted_requests == aborted + 1
        # The connection still serves calls after the cancel.
        ok = completion_pb2.CompletionRequest(prompt="Hi", max_tokens=2, user_id="lean")
        last = [
            raw
            async for raw in conn.stream(STREAM_COMPLETE, ok.SerializeToString(), served.user_md)
        ]
        assert completion_pb2.CompletionChunk.FromString(last[-1]).usage.completion_tokens == 2
    finally:
        conn.close()
