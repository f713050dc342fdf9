"""The store's write channel (feedback/write_channel.py) against real redis-servers, on uvloop
(the server's event loop) and on asyncio: batching, replies matched to their callers, error
replies, NOSCRIPT, timeouts, reconnection, AUTH/SELECT and unix sockets (TLS and the pipeline
fallback: test_redis_tls.py)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import StoreUnavailable
from instructloop.feedback.store import FeedbackStore
from instructloop.feedback.write_channel import Endpoint, ScriptChannel
from instructloop.redis_server import RedisProcess
from tests.support.records import make_completion

# SET a key, count the call, return both: each caller's reply names its own value.
SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return {ARGV[1], redis.call('INCR', KEYS[2])}
"""
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


def channel(url: str, *, timeout_s: float = 5.0, retries: int = 2, **kw: Any) -> ScriptChannel:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url)
    return ScriptChannel(
        Endpoint.from_pool(pool),
        max_batch=kw.get("max_batch", 128),
        in_flight=kw.get("in_flight", 1),
        timeout_s=timeout_s,
        connect_timeout_s=2.0,
        retries=retries,
        backoff=ExponentialBackoff(cap=0.05, base=0.01),
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_concurrent_calls_are_batched_and_each_gets_its_reply(
    loop: str, redis_url: str, redis_client: Any
) -> None:
    async def main() -> tuple[list[Any], ScriptChannel]:
        ch = channel(redis_url)
        try:
            calls = [
                ch.call(SHA, SCRIPT, 2, f"k{i}", "count", "fail" if i == 57 else f"v{i}")
                for i in range(200)
            ]
            return list(await asyncio.gather(*calls, return_exceptions=True)), ch
        finally:
            await ch.close()

    replies, ch = LOOPS[loop](main())
    failed = replies.pop(57)
    assert isinstance(failed, ResponseError) and "asked to fail" in str(failed)
    others = [i for i in range(200) if i != 57]
    assert [r[0] for r in replies] == [f"v{i}" for i in others]  # each caller its own reply
    assert sorted(r[1] for r in replies) == list(range(1, 200))  # each ran exactly once
    assert redis_client.get("k3") == b"v3" and int(redis_client.get("count")) == 199
    # 200 calls queued at once go out as 2 batches (at most 128 each); where Redis did not know
    # the script yet, a SCRIPT LOAD and a resend come on top: 2 or 4 round trips, not 200
    assert ch.batches_sent in (2, 4), ch.batches_sent


@pytest.mark.parametrize("loop", LOOPS)
def test_unknown_script_is_loaded_and_the_call_resent(
    loop: str, redis_url: str, redis_client: Any
) -> None:
    async def main() -> list[Any]:
        ch = channel(redis_url)
        try:
            first = await ch.call(SHA, SCRIPT, 2, "a", "count", "1")
            redis_client.script_flush()  # as after a Redis restart
            second = await ch.call(SHA, SCRIPT, 2, "b", "count", "2")
            return [first, second]
        finally:
            await ch.close()

    assert LOOPS[loop](main()) == [["1", 1], ["2", 2]]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stalled_redis_fails_the_call_and_the_channel_recovers(loop: str, tmp_path: Path) -> None:
    """No reply within timeout_s (Redis paused): the caller gets a TimeoutError (after the
    retries), not a hang; once Redis answers again the next call goes through."""
    proc = RedisProcess(dir=tmp_path / "r").start()
    admin = redis.Redis.from_url(proc.url)

    async def main() -> tuple[BaseException | None, Any]:
        ch = channel(proc.url, timeout_s=0.3, retries=1)
        try:
            await ch.call(SHA, SCRIPT, 2, "a", "count", "1")
            admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            err: BaseException | None = None
            try:
                await ch.call(SHA, SCRIPT, 2, "b", "count", "2")
            except RedisTimeoutError as e:
                err = e
            await asyncio.sleep(1.6)  # the pause is over
            after = await ch.call(SHA, SCRIPT, 2, "c", "count", "3")
            return err, after
        finally:
            await ch.close()

    try:
        err, after = LOOPS[loop](main())
        assert err is not None and "no reply from Redis within 0.3 s" in str(err)
        assert after[0] == "3"
    finally:
        admin.close()
        proc.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_reconnects_after_a_redis_restart(loop: str, tmp_path: Path) -> None:
    proc = RedisProcess(dir=tmp_path / "r").start()
    restarted: RedisProcess | None = None

    async def main() -> tuple[BaseException | None, Any]:
        nonlocal restarted
        ch = channel(proc.url, retries=0)
        try:
            await ch.call(SHA, SCRIPT, 2, "a", "count", "1")
            proc.stop(kill=True)
            down: BaseException | None = None
            try:
                await ch.call(SHA, SCRIPT, 2, "b", "count", "2")
            except RedisConnectionError as e:
                down = e
            restarted = RedisProcess(dir=tmp_path / "r", port=proc.port).start()
            return down, await ch.call(SHA, SCRIPT, 2, "c", "count", "3")
        finally:
            await ch.close()

    port = proc.port
    try:
        down, after = LOOPS[loop](main())
        assert isinstance(down, RedisConnectionError)
        # AOF with appendfsync always: the acknowledged first call survived the SIGKILL
        assert after == ["3", 2]
        assert restarted is not None and restarted.port == port
    finally:
        if restarted is not None:
            restarted.stop()


def test_auth_select_and_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    proc = RedisProcess(
        dir=tmp_path / "r", password="s3cret", extra_args=("--unixsocket", str(sock))
    ).start()
    check = redis.Redis.from_url(proc.url.replace("/0", "/3"), decode_responses=True)

    async def main() -> None:
        for url in (
            f"redis://:s3cret@127.0.0.1:{proc.port}/3",
            f"unix://{sock}?db=3&password=s3cret",
        ):
            store = FeedbackStore.from_url(url, StoreConfig(rate_limit_per_minute=0))
            try:
                rec = make_completion(2)
                await store.log_completion(rec)
                assert check.hget(f"il:cmpl:{rec.completion_id}", "record") is not None
            finally:
                await store.close()
        wrong = FeedbackStore.from_url(f"redis://:nope@127.0.0.1:{proc.port}/3")
        try:
            with pytest.raises(StoreUnavailable, match="nothing was stored"):
                await wrong.log_completion(make_completion(2))
        finally:
            await wrong.close()

    try:
        uvloop.run(main())
        assert len(check.keys("il:cmpl:*")) == 2  # one completion by each URL, in db 3
    finally:
        check.close()
        proc.stop()


def test_a_tls_url_whose_settings_do_not_work_is_refused_with_a_clear_error() -> None:
    """TLS itself works (tests/feedback/test_redis_tls.py); a CA file that is not there fails
    when the store is made, not on its first write."""
    with pytest.raises(ValueError, match="TLS settings"):
        FeedbackStore.from_url("rediss://127.0.0.1:6380/0?ssl_ca_certs=/nonexistent/ca.crt")
