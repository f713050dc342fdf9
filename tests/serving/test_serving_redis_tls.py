"""`serve` with its Redis over TLS (rediss://, a real redis-server with no plaintext port): a
second server on the session's engine logs completions and feedback there on the fast write
channel, and keeps its registry and replica report there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from instructloop.feedback.write_channel import ScriptChannel
from instructloop.v1 import completion_pb2, feedback_pb2, model_pb2
from tests.support.redis_tls import TlsRedis
from tests.support.rpc import stubs
from tests.support.server import Served, running_server

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    proc = TlsRedis(tmp_path_factory.mktemp("redis-tls")).start()
    try:
        yield proc
    finally:
        proc.stop()


async def test_serve_over_tls_redis(served: Served, tls_redis: TlsRedis, model_dir: Path) -> None:
    url = tls_redis.url(0)
    check = redis.Redis.from_url(url, decode_responses=True)
    check.flushdb()
    try:
        async with running_server(model_dir, url, engine=served.engine) as side:
            store = side.server.store
            assert isinstance(store._writes, ScriptChannel) and store._writes.endpoint.tls
            async with grpc.aio.insecure_channel(side.address) as ch:
                s = stubs(ch)
                resp = await s.completion.Complete(
                    completion_pb2.CompletionRequest(
                        prompt="Hello", n=2, max_tokens=3, user_id="alice"
                    ),
                    metadata=side.user_md,
                )
                assert resp.logged
                ack = await s.feedback.SubmitRanking(
                    feedback_pb2.SubmitRankingRequest(
                        user_id="alice",
                        idempotency_key="tls-1",
                        completion_id=resp.completion_id,
                        ranked_response_ids=[c.response_id for c in resp.choices][::-1],
                    ),
                    metadata=side.user_md,
                )
                served_model = await s.model.GetServingModel(
                    model_pb2.GetServingModelRequest(), metadata=side.admin_md
                )
        # Everything acknowledged is in the TLS Redis: the completion, the ranking, the
        # registry's live version (the one that answered) and the replica's report.
        assert check.exists(f"il:cmpl:{resp.completion_id}")
        assert check.exists(f"il:fb:{ack.feedback_id}")
        assert check.xlen("il:log:feedback") == 1
        assert check.hget("il:models:live", "version") == resp.model_version
        assert served_model.live_version == resp.model_version
    finally:
        check.close()
