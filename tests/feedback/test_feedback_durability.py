"""A private redis-server (AOF, appendfsync always) is SIGKILLed and restarted on the same port
and directory while many writers submit feedback: every acknowledged write survives, writes
during the outage fail with StoreUnavailable, and the store recovers by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
import uvloop

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import StoreUnavailable
from instructloop.feedback.store import Ack, FeedbackStore
from instructloop.redis_server import RedisProcess
from tests.support.records import ids, make_completion


async def _wait_for(cond, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sigkill_restart_during_feedback_stream(tmp_path: Path, loop: str) -> None:
    """On uvloop (what the server runs on) and on asyncio."""
    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(_sigkill_restart_during_feedback_stream(tmp_path))


async def _sigkill_restart_during_feedback_stream(tmp_path: Path) -> None:
    proc = RedisProcess(dir=tmp_path / "redis", appendfsync="always").start()
    port = proc.port
    url = proc.url
    store = FeedbackStore.from_url(
        url, StoreConfig(rate_limit_per_minute=0, socket_timeout_s=2.0, retries=1)
    )
    restarted: RedisProcess | None = None
    try:
        recs = [make_completion(4) for _ in range(8)]
        for rec in recs:
            await store.log_completion(rec)

        acked: dict[str, Ack] = {}  # idempotency key -> ack
        failed: list[str] = []
        unexpected: list[BaseException] = []
        stop = False

        async def writer(w: int) -> None:
            i = 0
            while not stop:
                key = f"w{w}-{i}"
                rec = recs[i % len(recs)]
                order = ids(rec)[::-1] if i % 2 else ids(rec)
                i += 1
                try:
                    acked[key] = await store.submit_ranking(
                        user_id=f"user-{w}",
                        idempotency_key=key,
                        completion_id=rec.completion_id,
                        ranked_response_ids=order,
                    )
                except StoreUnavailable:
                    failed.append(key)
                    await asyncio.sleep(0.005)
                except BaseException as e:  # anything else is a bug
                    unexpected.append(e)
                    return

        tasks = [asyncio.create_task(writer(w)) for w in range(16)]
        await _wait_for(lambda: len(acked) >= 300, "writes before the crash")
        proc.stop(kill=True)  # SIGKILL: no shutdown, no final fsync
        acked_at_kill = len(acked)
        await _wait_for(lambda: len(failed) >= 32, "failures during the outage")
        restarted = RedisProcess(dir=tmp_path / "redis", port=port, appendfsync="always").start()
        await _wait_for(lambda: len(acked) >= acked_at_kill + 300, "writes after the restart")
        stop = True
        await asyncio.gather(*tasks)
        assert not unexpected, unexpected

        check = redis.Redis.from_url(url, decode_responses=True)
        # every acknowledged write is there, whole, and in the feedback log
        pipe = check.pipeline(transaction=False)
        for ack in acked.values():
            pipe.hget(f"il:fb:{ack.feedback_id}", "feedback_id")
        assert pipe.execute() == [a.feedback_id for a in acked.values()]
        logged = [e[1]["feedback_id"] for e in check.xrange("il:log:feedback")]
        assert len(logged) == len(set(logged))
        assert {a.feedback_id for a in acked.values()} <= set(logged)
        # no half-written record: records, log entries and the counter agree
        assert int(check.hget("il:stats", "feedback:ranking")) == len(logged)
        assert len(check.keys("il:fb:*")) == len(logged)
        # the completions logged before the crash survived too
        for rec in recs:
            assert await store.get_completion(rec.completion_id) == rec

        # a client retrying its failed writes with the same keys gets each stored exactly once
        for key in failed:
            w, i = key[1:].split("-")
            rec = recs[int(i) % len(recs)]
            await store.submit_ranking(
                user_id=f"user-{w}",
                idempotency_key=key,
                completion_id=rec.completion_id,
                ranked_response_ids=ids(rec)[::-1] if int(i) % 2 else ids(rec),
            )
        assert check.xlen("il:log:feedback") == len(acked) + len(failed)
        check.close()
    finally:
        await store.close()
        proc.stop()
        if restarted is not None:
            restarted.stop()


@pytest.mark.parametrize("appendfsync", ["always"])
def test_private_server_runs_with_aof(tmp_path: Path, appendfsync: str) -> None:
    """The server the durability test relies on really has AOF with fsync on every write."""
    proc = RedisProcess(dir=tmp_path / "r", appendfsync=appendfsync).start()
    try:
        c = redis.Redis.from_url(proc.url, decode_responses=True)
        assert c.config_get("appendonly")["appendonly"] == "yes"
        assert c.config_get("appendfsync")["appendfsync"] == appendfsync
        c.close()
    finally:
        proc.stop()
