"""Redis over TLS (rediss://) against a real redis-server that has no plaintext port: the
feedback store on its fast write channel and on the redis-py pipeline fallback, a server whose
certificate is not trusted, bad TLS settings, the model registry, and `feedback export`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import uvloop

from instructloop.cli import main as cli_main
from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import StoreUnavailable
from instructloop.feedback.export import ExportManifest
from instructloop.feedback.store import FeedbackStore
from instructloop.feedback.write_channel import PipelineChannel, ScriptChannel
from instructloop.registry import AsyncModelRegistry, ModelRegistry
from tests.support.records import ids, make_completion, seed_feedback
from tests.support.redis_tls import TlsRedis

CFG = StoreConfig(rate_limit_per_minute=0)
# The server runs on uvloop, whose TLS transport is its own; the tests of other tools, on asyncio.
LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    proc = TlsRedis(tmp_path_factory.mktemp("redis-tls")).start()
    try:
        yield proc
    finally:
        proc.stop()


def _client(tls: TlsRedis, db: int) -> redis.Redis:
    """A sync client of the same URL, flushed: what the test reads back with."""
    c = redis.Redis.from_url(tls.url(db), decode_responses=True)
    c.flushdb()
    return c


async def _log_and_rank(
    store: FeedbackStore, n: int, key: str = "k"
) -> list[tuple[list[str], str]]:
    """n completions logged and ranked concurrently (so writes share batches): (response ids,
    feedback id) of each."""
    recs = [make_completion(3) for _ in range(n)]
    await asyncio.gather(*(store.log_completion(r) for r in recs))
    acks = await asyncio.gather(
        *(
            store.submit_ranking(
                user_id="alice",
                idempotency_key=f"{key}{i}",
                completion_id=r.completion_id,
                ranked_response_ids=ids(r)[::-1],
            )
            for i, r in enumerate(recs)
        )
    )
    assert not any(a.duplicate for a in acks)
    return [(ids(r), a.feedback_id) for r, a in zip(recs, acks, strict=True)]


@pytest.mark.parametrize("loop", LOOPS)
def test_store_over_tls_uses_the_fast_channel_and_every_ack_is_stored(
    loop: str, tls_redis: TlsRedis
) -> None:
    check = _client(tls_redis, 1)

    async def main() -> list[tuple[list[str], str]]:
        store = FeedbackStore.from_url(tls_redis.url(1), CFG)
        try:
            assert isinstance(store._writes, ScriptChannel)
            assert store._writes.endpoint.tls is not None
            done = await _log_and_rank(store, 24)
            assert store._writes.batches_sent < 48  # concurrent writes shared batches
            fb = await store.get_feedback(done[0][1])  # reads go through redis-py's pool
            assert fb is not None and fb.response_ids == done[0][0][::-1]
            return done
        finally:
            await store.close()

    try:
        done = LOOPS[loop](main())
        for response_ids, feedback_id in done:
            assert check.exists(f"il:fb:{feedback_id}")
            assert all(check.exists(f"il:resp:{r}") for r in response_ids)
        assert check.xlen("il:log:feedback") == 24
    finally:
        check.close()


class _OwnConnection(aioredis.SSLConnection):
    """A connection class of the caller's own: the write channel cannot copy its behaviour."""


def test_a_pool_the_fast_channel_cannot_copy_writes_through_redis_pipelines(
    tls_redis: TlsRedis,
) -> None:
    check = _client(tls_redis, 2)

    async def main() -> list[tuple[list[str], str]]:
        pool = aioredis.ConnectionPool.from_url(
            tls_redis.url(2), connection_class=_OwnConnection, decode_responses=True
        )
        store = FeedbackStore(aioredis.Redis(connection_pool=pool), CFG)
        try:
            assert isinstance(store._writes, PipelineChannel)
            first = await _log_and_rank(store, 6)
            # Redis forgot the scripts (a restart): the channel loads them and runs the calls.
            await store.client.script_flush()
            second = await _log_and_rank(store, 6, key="again")
            # A resubmission with the same key is the first ack again, stored once.
            rec = make_completion(2)
            await store.log_completion(rec)
            kw: dict[str, Any] = {
                "user_id": "bob",
                "idempotency_key": "same",
                "completion_id": rec.completion_id,
                "ranked_response_ids": ids(rec),
            }
            a, b = await store.submit_ranking(**kw), await store.submit_ranking(**kw)
            assert (a.feedback_id, a.duplicate, b.duplicate) == (b.feedback_id, False, True)
            return [*first, *second]
        finally:
            await store.close()

    try:
        done = asyncio.run(main())
        assert all(check.exists(f"il:fb:{fid}") for _, fid in done)
        assert check.xlen("il:log:feedback") == len(done) + 1
    finally:
        check.close()


def test_a_server_whose_certificate_is_not_trusted_gets_nothing(tls_redis: TlsRedis) -> None:
    """rediss:// without the test CA checks the server against the system's roots: refused,
    the caller is not acknowledged, and nothing is written."""
    check = _client(tls_redis, 3)
    untrusted = f"rediss://127.0.0.1:{tls_redis.port}/3"

    async def main() -> None:
        store = FeedbackStore.from_url(untrusted, StoreConfig(retries=0))
        try:
            with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await store.log_completion(make_completion(2))
        finally:
            await store.close()

    try:
        asyncio.run(main())
        assert check.dbsize() == 0
    finally:
        check.close()


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("ssl_ca_certs=/nonexistent/ca.crt", "No such file"),
        ("ssl_cert_reqs=sometimes", "Invalid SSL Certificate Requirements"),
    ],
)
def test_tls_settings_that_do_not_work_fail_when_the_store_is_made(query: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"TLS settings of this Redis URL do not work: .*{reason}"):
        FeedbackStore.from_url(f"rediss://127.0.0.1:6380/0?{query}")


def test_the_registry_over_tls(tls_redis: TlsRedis, model_dir: Path) -> None:
    check = _client(tls_redis, 4)
    reg = ModelRegistry(tls_redis.url(4))
    try:
        v = reg.register(model_dir, source="test")
        reg.promote(v.version)
        live = reg.live()
        assert live is not None and live.version == v.version

        async def from_the_async_twin() -> tuple[str | None, list[str]]:
            areg = AsyncModelRegistry(tls_redis.url(4))
            try:
                await areg.report_replica("r1", {"version": v.version})
                alive = await areg.live()
                return (alive.version if alive else None), [m.version for m in await areg.list()]
            finally:
                await areg.close()

        assert asyncio.run(from_the_async_twin()) == (v.version, [v.version])
        assert [r.get("version") for r in reg.replicas()] == [v.version]
    finally:
        reg.close()
        check.close()


def test_feedback_export_over_tls(
    tls_redis: TlsRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check = _client(tls_redis, 5)
    try:
        seeded = seed_feedback(tls_redis.url(5), n=3)
        out = tmp_path / "export"
        rc = cli_main(["feedback", "export", "--out", str(out), "--redis-url", tls_redis.url(5)])
        assert rc == 0, capsys.readouterr().err
        m = ExportManifest.from_file(out)
        skipped = {fid for fids in m.skipped.values() for fid in fids}
        assert m.feedback_ids and set(m.feedback_ids) | skipped == set(seeded)
    finally:
        check.close()
