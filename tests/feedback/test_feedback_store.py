"""The async feedback store against the real Redis (db 15): what is stored, validation,
idempotency, concurrency, rate limit, retention, and Redis being down."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import (
    IdempotencyConflict,
    InvalidFeedback,
    InvalidRecord,
    NotFound,
    RateLimited,
    StoreUnavailable,
)
from instructloop.feedback.records import CompletionRecord, FeedbackRecord
from instructloop.feedback.store import FeedbackStore, normalize_ranks
from instructloop.redis_server import free_port
from tests.support.records import ids, make_completion
from tests.support.redis_state import db_state


@pytest.fixture
async def store(redis_client: Any, redis_url: str) -> AsyncIterator[FeedbackStore]:
    s = FeedbackStore.from_url(redis_url, StoreConfig(rate_limit_per_minute=0))
    yield s
    await s.close()


async def logged(store: FeedbackStore, k: int = 4, **kw: Any) -> CompletionRecord:
    rec = make_completion(k, **kw)
    await store.log_completion(rec)
    return rec


# -- completions ------------------------------------------------------------------------------


async def test_completion_record_and_indexes(store: FeedbackStore, redis_client: Any) -> None:
    rec = make_completion(3, messages=[{"role": "user", "content": "Hi"}])
    await store.log_completion(rec)

    assert await store.get_completion(rec.completion_id) == rec
    h = redis_client.hgetall(f"il:cmpl:{rec.completion_id}")
    assert json.loads(h[b"record"]) == rec.to_dict()
    # response -> completion index, and the completion's own response list
    for i, r in enumerate(rec.responses):
        assert redis_client.get(f"il:resp:{r.response_id}") == rec.completion_id.encode()
        assert h[f"r:{r.response_id}".encode()] == str(i).encode()
    entries = redis_client.xrange("il:log:completions")
    assert [e[1] for e in entries] == [{b"completion_id": rec.completion_id.encode()}]
    assert await store.counters() == {"completions": 1}
    # a retry of the same record is a no-op
    await store.log_completion(rec)
    assert redis_client.xlen("il:log:completions") == 1
    assert await store.counters() == {"completions": 1}
    # nothing expires by default
    assert redis_client.ttl(f"il:cmpl:{rec.completion_id}") == -1


async def test_completion_conflicts_store_nothing(store: FeedbackStore, redis_client: Any) -> None:
    rec = await logged(store)
    before = db_state(redis_client)
    other = make_completion(2)
    same_id = CompletionRecord(**{**_fields(other), "completion_id": rec.completion_id})
    with pytest.raises(InvalidRecord, match="already logged"):
        await store.log_completion(same_id)
    taken = CompletionRecord(**{**_fields(other), "responses": [rec.responses[0]]})
    with pytest.raises(InvalidRecord, match="already belongs"):
        await store.log_completion(taken)
    bad = [
        CompletionRecord(**{**_fields(other), "responses": []}),
        CompletionRecord(**{**_fields(other), "model_version": ""}),
        CompletionRecord(**{**_fields(other), "messages": [{"role": "user", "content": "x"}]}),
        CompletionRecord(**{**_fields(other), "metadata": {f"k{i}": "v" for i in range(33)}}),
        CompletionRecord(**{**_fields(other), "responses": [other.responses[0]] * 2}),
    ]
    for b in bad:
        with pytest.raises(InvalidRecord):
            await store.log_completion(b)
    assert db_state(redis_client) == before


def _fields(rec: CompletionRecord) -> dict[str, Any]:
    return {f: getattr(rec, f) for f in rec.__dataclass_fields__}


async def test_completion_write_is_atomic(store: FeedbackStore, redis_url: str) -> None:
    """A reader never sees a completion half-written (record without index or log entry)."""
    import redis

    reader = redis.Redis.from_url(redis_url)
    recs = [make_completion(8) for _ in range(40)]
    seen: list[tuple[int, int, int]] = []
    stop = False

    def observe() -> None:
        while not stop:
            for rec in recs:
                pipe = reader.pipeline(transaction=True)
                pipe.exists(f"il:cmpl:{rec.completion_id}")
                pipe.exists(*(f"il:resp:{r}" for r in ids(rec)))
                pipe.xrange("il:log:completions")
                have, n_idx, log = pipe.execute()
                in_log = sum(e[1][b"completion_id"] == rec.completion_id.encode() for e in log)
                seen.append((have, n_idx, in_log))

    task = asyncio.create_task(asyncio.to_thread(observe))
    await asyncio.sleep(0.05)
    for rec in recs:
        await store.log_completion(rec)
        await asyncio.sleep(0)
    stop = True
    await task
    reader.close()
    assert seen
    assert set(seen) <= {(0, 0, 0), (1, 8, 1)}, set(seen) - {(0, 0, 0), (1, 8, 1)}


# -- feedback: what is stored ---------------------------------------------------------------


async def test_ranking_stored_with_stream_and_counter(
    store: FeedbackStore, redis_client: Any
) -> None:
    rec = await logged(store)
    order = [ids(rec)[i] for i in (2, 0, 3, 1)]
    ack = await store.submit_ranking(
        user_id="alice",
        idempotency_key="k1",
        completion_id=rec.completion_id,
        ranked_response_ids=order,
        ranks=[1, 2, 2, 3],
    )
    assert ack.feedback_id.startswith("fb-") and len(ack.feedback_id) == 35
    assert not ack.duplicate
    assert ack.completion_id == rec.completion_id
    fb = await store.get_feedback(ack.feedback_id)
    assert fb == FeedbackRecord(
        feedback_id=ack.feedback_id,
        kind="ranking",
        user_id="alice",
        idempotency_key="k1",
        completion_id=rec.completion_id,
        created_at=ack.created_at,
        response_ids=order,
        ranks=[1, 2, 2, 3],
    )
    assert fb.ordering() == (order, [1, 2, 2, 3])
    log = redis_client.xrange("il:log:feedback")
    assert [e[1] for e in log] == [
        {
            b"feedback_id": ack.feedback_id.encode(),
            b"kind": b"ranking",
            b"completion_id": rec.completion_id.encode(),
        }
    ]
    assert await store.counters() == {"completions": 1, "feedback:ranking": 1}


async def test_comparison_and_rating_find_their_completion(store: FeedbackStore) -> None:
    rec = await logged(store, 2)
    a, b = ids(rec)
    cmp_ack = await store.submit_comparison(
        user_id="bob", idempotency_key=None, chosen_response_id=b, rejected_response_id=a
    )
    tie_ack = await store.submit_comparison(
        user_id="bob", idempotency_key="", chosen_response_id=a, rejected_response_id=b, tie=True
    )
    rate_ack = await store.submit_rating(
        user_id="bob", idempotency_key="r", response_id=a, scale="likert7", score=6
    )
    thumb_ack = await store.submit_rating(
        user_id="bob", idempotency_key="t", response_id=b, scale="thumb", score=-1
    )
    cmp_fb = await store.get_feedback(cmp_ack.feedback_id)
    tie_fb = await store.get_feedback(tie_ack.feedback_id)
    rate_fb = await store.get_feedback(rate_ack.feedback_id)
    thumb_fb = await store.get_feedback(thumb_ack.feedback_id)
    assert cmp_fb and tie_fb and rate_fb and thumb_fb
    assert {f.completion_id for f in (cmp_fb, tie_fb, rate_fb, thumb_fb)} == {rec.completion_id}
    assert cmp_fb.ordering() == ([b, a], [1, 2])
    assert tie_fb.ordering() == ([a, b], [1, 1])
    assert cmp_fb.idempotency_key == ""
    assert (rate_fb.response_id, rate_fb.scale, rate_fb.score) == (a, "likert7", 6)
    assert (thumb_fb.response_id, thumb_fb.scale, thumb_fb.score) == (b, "thumb", -1)
    assert await store.counters() == {
        "completions": 1,
        "feedback:comparison": 2,
        "feedback:rating": 2,
    }


# -- validation: a clear error, nothing stored ------------------------------------------------


def test_normalize_ranks() -> None:
    assert normalize_ranks([], 3) == [1, 2, 3]
    assert normalize_ranks(None, 2) == [1, 2]
    assert normalize_ranks([1, 1, 2], 3) == [1, 1, 2]
    assert normalize_ranks([1, 1, 1], 3) == [1, 1, 1]
    for bad in ([1, 2], [2, 3, 4], [1, 3, 2], [1, 2, 1], [1, 3, 4], [0, 1, 2]):
        with pytest.raises(InvalidFeedback):
            normalize_ranks(bad, 3)


async def test_every_invalid_request_stores_nothing(
    store: FeedbackStore, redis_client: Any
) -> None:
    rec = await logged(store)
    other = await logged(store, 2)
    r = ids(rec)
    o = ids(other)
    missing = "resp-" + "0" * 32
    rank = store.submit_ranking
    cmp = store.submit_comparison
    rate = store.submit_rating
    cid = rec.completion_id
    cases: list[tuple[Any, type[Exception], str]] = [
        # missing user
        (rank(user_id="", idempotency_key="k", completion_id=cid, ranked_response_ids=r[:2]),
         InvalidFeedback, "user_id is required"),
        (rate(user_id="", idempotency_key=None, response_id=r[0], scale="thumb", score=1),
         InvalidFeedback, "user_id"),
        # comparison
        (cmp(user_id="u", idempotency_key="k", chosen_response_id=r[0],
             rejected_response_id=r[0]), InvalidFeedback, "twice"),
        (cmp(user_id="u", idempotency_key="k", chosen_response_id=r[0],
             rejected_response_id=o[0]), InvalidFeedback, "different completions"),
        (cmp(user_id="u", idempotency_key="k", chosen_response_id=missing,
             rejected_response_id=r[0]), NotFound, missing),
        (cmp(user_id="u", idempotency_key="k", chosen_response_id=r[0],
             rejected_response_id=missing), NotFound, missing),
        (cmp(user_id="u", idempotency_key="k", chosen_response_id="",
             rejected_response_id=r[0]), InvalidFeedback, "chosen_response_id is required"),
        # ranking
        (rank(user_id="u", idempotency_key="k", completion_id=cid, ranked_response_ids=r[:1]),
         InvalidFeedback, "at least 2"),
        (rank(user_id="u", idempotency_key="k", completion_id=cid,
              ranked_response_ids=[r[0], r[1], r[0]]), InvalidFeedback, "more than once"),
        (rank(user_id="u", idempotency_key="k", completion_id=cid,
              ranked_response_ids=[r[0], o[0]]), InvalidFeedback, "belongs to completion"),
        (rank(user_id="u", idempotency_key="k", completion_id=cid,
              ranked_response_ids=[r[0], missing]), NotFound, missing),
        (rank(user_id="u", idempotency_key="k", completion_id="cmpl-" + "0" * 32,
              ranked_response_ids=r[:2]), NotFound, "completion cmpl-"),
        (rank(user_id="u", idempotency_key="k", completion_id="", ranked_response_ids=r[:2]),
         InvalidFeedback, "completion_id is required"),
        (rank(user_id="u", idempotency_key="k", completion_id=cid, ranked_response_ids=r,
              ranks=[1, 2, 3]), InvalidFeedback, "4 ranked"),
        (rank(user_id="u", idempotency_key="k", completion_id=cid, ranked_response_ids=r,
              ranks=[2, 2, 3, 4]), InvalidFeedback, "start at 1"),
        (rank(user_id="u", idempotency_key="k", completion_id=cid, ranked_response_ids=r,
              ranks=[1, 2, 1, 3]), InvalidFeedback, "not decrease"),
        (rank(user_id="u", idempotency_key="k", completion_id=cid, ranked_response_ids=r,
              ranks=[1, 2, 4, 5]), InvalidFeedback, "dense"),
        (rank(user_id="u", idempotency_key="k" * 300, completion_id=cid,
              ranked_response_ids=r), InvalidFeedback, "at most 256"),
        # rating
        (rate(user_id="u", idempotency_key="k", response_id=r[0], scale="stars", score=3),
         InvalidFeedback, "unknown rating scale"),
        (rate(user_id="u", idempotency_key="k", response_id=r[0], scale="thumb", score=0),
         InvalidFeedback, "+1 or -1"),
        (rate(user_id="u", idempotency_key="k", response_id=r[0], scale="likert7", score=8),
         InvalidFeedback, "1 to 7"),
        (rate(user_id="u", idempotency_key="k", response_id=r[0], scale="likert7", score=0),
         InvalidFeedback, "1 to 7"),
        (rate(user_id="u", idempotency_key="k", response_id=missing, scale="thumb", score=1),
         NotFound, missing),
    ]  # fmt: skip
    before = db_state(redis_client)
    for coro, exc, msg in cases:
        with pytest.raises(exc, match=re.escape(msg)):
            await coro
        assert db_state(redis_client) == before, msg
    # and the key "k" is still free for a valid judgement
    ack = await store.submit_ranking(
        user_id="u", idempotency_key="k", completion_id=cid, ranked_response_ids=r
    )
    assert not ack.duplicate


# -- idempotency --------------------------------------------------------------------------------


async def test_same_key_same_payload_counts_once(store: FeedbackStore, redis_client: Any) -> None:
    rec = await logged(store, 3)
    kw = dict(user_id="u", idempotency_key="key-1", completion_id=rec.completion_id)
    first = await store.submit_ranking(**kw, ranked_response_ids=ids(rec))  # type: ignore[arg-type]
    # explicit strict ranks are the same judgement as none
    again = await store.submit_ranking(**kw, ranked_response_ids=ids(rec), ranks=[1, 2, 3])  # type: ignore[arg-type]
    assert again.feedback_id == first.feedback_id
    assert again.created_at == first.created_at
    assert (first.duplicate, again.duplicate) == (False, True)
    assert redis_client.xlen("il:log:feedback") == 1
    assert len(redis_client.keys("il:fb:*")) == 1
    assert (await store.counters())["feedback:ranking"] == 1

    with pytest.raises(IdempotencyConflict, match="different judgement") as err:
        await store.submit_ranking(**kw, ranked_response_ids=ids(rec)[::-1])  # type: ignore[arg-type]
    assert err.value.feedback_id == first.feedback_id
    with pytest.raises(IdempotencyConflict):  # another kind under the same key conflicts too
        await store.submit_rating(
            user_id="u", idempotency_key="key-1", response_id=ids(rec)[0], scale="thumb", score=1
        )
    # the same key of another user is another judgement
    other = await store.submit_ranking(
        user_id="v", idempotency_key="key-1", completion_id=rec.completion_id,
        ranked_response_ids=ids(rec)[::-1],
    )  # fmt: skip
    assert other.feedback_id != first.feedback_id and not other.duplicate
    # user ids with ":" cannot collide with keys: ("a:b", "c") vs ("a", "b:c")
    x = await store.submit_rating(
        user_id="a:b", idempotency_key="c", response_id=ids(rec)[0], scale="thumb", score=1
    )
    y = await store.submit_rating(
        user_id="a", idempotency_key="b:c", response_id=ids(rec)[0], scale="thumb", score=-1
    )
    assert x.feedback_id != y.feedback_id and not y.duplicate
    assert redis_client.xlen("il:log:feedback") == 4


async def test_unicode_ids_round_trip(store: FeedbackStore) -> None:
    rec = await logged(store, 2)
    user, key = "ユーザー😀", "ключ:ü"
    ack = await store.submit_comparison(
        user_id=user, idempotency_key=key, chosen_response_id=ids(rec)[0],
        rejected_response_id=ids(rec)[1],
    )  # fmt: skip
    fb = await store.get_feedback(ack.feedback_id)
    assert fb is not None and (fb.user_id, fb.idempotency_key) == (user, key)
    again = await store.submit_comparison(
        user_id=user, idempotency_key=key, chosen_response_id=ids(rec)[0],
        rejected_response_id=ids(rec)[1],
    )  # fmt: skip
    assert again.duplicate and again.feedback_id == ack.feedback_id


async def test_without_key_every_submission_is_new(store: FeedbackStore) -> None:
    rec = await logged(store, 2)
    a, b = ids(rec)
    acks = [
        await store.submit_comparison(
            user_id="u", idempotency_key=None, chosen_response_id=a, rejected_response_id=b
        )
        for _ in range(3)
    ]
    assert len({x.feedback_id for x in acks}) == 3
    assert not any(x.duplicate for x in acks)


async def test_retried_write_is_recognised_not_doubled(
    store: FeedbackStore, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write re-sent after a lost reply carries the same feedback id: stored once, and
    acknowledged as new (not as someone else's duplicate)."""
    rec = await logged(store, 2)
    for n, key in enumerate([None, "k"], start=1):
        fixed = uuid.UUID(int=n)
        monkeypatch.setattr("instructloop.feedback.store.uuid.uuid4", lambda fixed=fixed: fixed)
        first = await store.submit_rating(
            user_id="u", idempotency_key=key, response_id=ids(rec)[0], scale="thumb", score=1
        )
        retry = await store.submit_rating(
            user_id="u", idempotency_key=key, response_id=ids(rec)[0], scale="thumb", score=1
        )
        assert first.feedback_id == retry.feedback_id == "fb-" + fixed.hex
        assert (first.duplicate, retry.duplicate) == (False, False)
        assert redis_client.xlen("il:log:feedback") == n


async def test_concurrent_submits_with_one_key_store_one_record(
    store: FeedbackStore, redis_client: Any
) -> None:
    rec = await logged(store, 4)
    acks = await asyncio.gather(
        *(
            store.submit_ranking(
                user_id="u",
                idempotency_key="same",
                completion_id=rec.completion_id,
                ranked_response_ids=ids(rec),
            )
            for _ in range(64)
        )
    )
    assert len({a.feedback_id for a in acks}) == 1
    assert sum(not a.duplicate for a in acks) == 1
    assert redis_client.xlen("il:log:feedback") == 1
    assert len(redis_client.keys("il:fb:*")) == 1
    assert (await store.counters())["feedback:ranking"] == 1


async def test_many_concurrent_distinct_submits_all_stored(
    store: FeedbackStore, redis_client: Any
) -> None:
    recs = [await logged(store, 4) for _ in range(8)]
    acks = await asyncio.gather(
        *(
            store.submit_ranking(
                user_id=f"u{i % 5}",
                idempotency_key=f"k{i}",
                completion_id=recs[i % 8].completion_id,
                ranked_response_ids=ids(recs[i % 8]),
            )
            for i in range(500)
        )
    )
    assert len({a.feedback_id for a in acks}) == 500
    logged_ids = {e[1][b"feedback_id"].decode() for e in redis_client.xrange("il:log:feedback")}
    assert logged_ids == {a.feedback_id for a in acks}


# -- rate limit -------------------------------------------------------------------------------


async def test_rate_limit_counts_only_stored_feedback(redis_client: Any, redis_url: str) -> None:
    store = FeedbackStore.from_url(redis_url, StoreConfig(rate_limit_per_minute=3))
    try:
        rec = await logged(store, 2)
        a = ids(rec)[0]

        async def thumbs(user: str, key: str) -> Any:
            return await store.submit_rating(
                user_id=user, idempotency_key=key, response_id=a, scale="thumb", score=1
            )

        with pytest.raises(InvalidFeedback):  # rejected requests do not count
            await store.submit_rating(
                user_id="u", idempotency_key="x", response_id=a, scale="thumb", score=5
            )
        with pytest.raises(NotFound):
            await store.submit_rating(
                user_id="u", idempotency_key="x", response_id="resp-x", scale="thumb", score=1
            )
        acks = [await thumbs("u", f"k{i}") for i in range(3)]
        before = db_state(redis_client)
        with pytest.raises(RateLimited, match="limit 3") as err:
            await thumbs("u", "k3")
        assert 0 < err.value.retry_after_s <= 60
        assert db_state(redis_client) == before  # refused: nothing stored, not counted
        # a replay of an acknowledged judgement still answers (a client retrying is not abuse)
        replay = await thumbs("u", "k1")
        assert replay.duplicate and replay.feedback_id == acks[1].feedback_id
        # other users have their own budget
        assert not (await thumbs("w", "k3")).duplicate
        rl_keys = redis_client.keys("il:rl:*")
        assert len(rl_keys) == 2
        assert all(0 < redis_client.ttl(k) <= 120 for k in rl_keys)
    finally:
        await store.close()


# -- retention --------------------------------------------------------------------------------


async def test_ttls_and_stream_trimming(redis_client: Any, redis_url: str) -> None:
    cfg = StoreConfig(
        completion_ttl_s=1000, feedback_ttl_s=500, stream_maxlen=10, rate_limit_per_minute=0
    )
    store = FeedbackStore.from_url(redis_url, cfg)
    try:
        rec = await logged(store, 2)
        ack = await store.submit_rating(
            user_id="u", idempotency_key="k", response_id=ids(rec)[0], scale="thumb", score=1
        )
        for key in [f"il:cmpl:{rec.completion_id}", *(f"il:resp:{r}" for r in ids(rec))]:
            assert 990 < redis_client.ttl(key) <= 1000, key
        for key in [f"il:fb:{ack.feedback_id}", "il:idem:1:u:k"]:
            assert 490 < redis_client.ttl(key) <= 500, key
        for i in range(600):
            await store.submit_rating(
                user_id="u", idempotency_key=None, response_id=ids(rec)[i % 2], scale="thumb",
                score=1,
            )  # fmt: skip
        # approximate trimming (MAXLEN ~) drops whole stream nodes: far fewer than 601 remain
        assert redis_client.xlen("il:log:feedback") < 300
    finally:
        await store.close()


async def test_feedback_on_expired_completion_is_not_found(
    redis_client: Any, redis_url: str
) -> None:
    store = FeedbackStore.from_url(redis_url, StoreConfig(completion_ttl_s=1))
    try:
        rec = await logged(store, 2)
        for _ in range(100):  # wait for Redis to expire the record (TTL 1 s)
            if not redis_client.exists(f"il:cmpl:{rec.completion_id}", f"il:resp:{ids(rec)[0]}"):
                break
            await asyncio.sleep(0.05)
        with pytest.raises(NotFound, match="expired"):
            await store.submit_comparison(
                user_id="u", idempotency_key=None, chosen_response_id=ids(rec)[0],
                rejected_response_id=ids(rec)[1],
            )  # fmt: skip
        assert redis_client.xlen("il:log:feedback") == 0
    finally:
        await store.close()


# -- faults -----------------------------------------------------------------------------------


async def test_redis_down_raises_store_unavailable() -> None:
    store = FeedbackStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert not await store.ping()
        with pytest.raises(StoreUnavailable, match="nothing was stored"):
            await store.log_completion(make_completion(2))
        with pytest.raises(StoreUnavailable):
            await store.submit_rating(
                user_id="u", idempotency_key=None, response_id="resp-x", scale="thumb", score=1
            )
        with pytest.raises(StoreUnavailable):
            await store.get_completion("cmpl-x")
    finally:
        await store.close()


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        StoreConfig(completion_ttl_s=0)
    with pytest.raises(ValueError):
        StoreConfig(rate_limit_per_minute=-1)
    with pytest.raises(ValueError):
        StoreConfig(key_prefix="")
