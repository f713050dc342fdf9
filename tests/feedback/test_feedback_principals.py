"""The feedback store under principals (serving/auth.py): the user's rate limit and idempotency
keys are its own within its principal, a principal's own limit counts all its users, and records
name their principal."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import RateLimited
from instructloop.feedback.keys import Keys
from instructloop.feedback.records import CompletionRecord
from instructloop.feedback.store import Ack, FeedbackStore
from tests.support.records import ids, make_completion
from tests.support.redis_state import db_state


def away_from_window_edge(window_s: int = 60, margin_s: float = 10.0) -> None:
    """Sleep past the next window start when the current window ends within `margin_s`: the
    store's fixed windows would otherwise reset a count in the middle of a test."""
    left = window_s - time.time() % window_s
    if left < margin_s:
        time.sleep(left + 0.05)


@pytest.fixture
async def make_store(redis_client: Any, redis_url: str) -> AsyncIterator[Any]:
    stores: list[FeedbackStore] = []

    def make(**cfg: Any) -> FeedbackStore:
        s = FeedbackStore.from_url(redis_url, StoreConfig(**cfg))
        stores.append(s)
        return s

    yield make
    for s in stores:
        await s.close()


async def logged(store: FeedbackStore) -> CompletionRecord:
    rec = make_completion(2)
    await store.log_completion(rec)
    return rec


def rater(store: FeedbackStore, response_id: str) -> Any:
    async def thumbs(principal: str, user: str, key: str) -> Ack:
        return await store.submit_rating(
            principal=principal,
            user_id=user,
            idempotency_key=key,
            response_id=response_id,
            scale="thumb",
            score=1,
        )

    return thumbs


async def test_user_limit_is_per_user_within_its_principal(make_store: Any) -> None:
    store = make_store(rate_limit_per_minute=2)
    thumbs = rater(store, ids(await logged(store))[0])
    away_from_window_edge()
    for i in range(2):
        await thumbs("app-a", "u", f"k{i}")
    with pytest.raises(RateLimited, match="user 'u'") as err:
        await thumbs("app-a", "u", "k2")
    assert err.value.scope == "user" and err.value.principal == "app-a"
    # The same user id under another principal is another user.
    await thumbs("app-b", "u", "k2")


async def test_principal_limit_counts_all_its_users(make_store: Any, redis_client: Any) -> None:
    store = make_store(rate_limit_per_minute=0, principal_rate_limit_per_minute=2)
    thumbs = rater(store, ids(await logged(store))[0])
    away_from_window_edge()
    acks = [await thumbs("app-a", f"user-{i}", "k") for i in range(2)]
    before = db_state(redis_client)
    with pytest.raises(RateLimited, match=r"principal 'app-a'.*limit 2") as err:
        await thumbs("app-a", "a-new-user", "k")  # a new user id does not escape
    assert err.value.scope == "principal" and 0 < err.value.retry_after_s <= 60
    assert db_state(redis_client) == before  # refused: nothing stored, nothing counted
    # A replay is still answered; another principal has its own budget.
    assert (await thumbs("app-a", "user-0", "k")).feedback_id == acks[0].feedback_id
    await thumbs("app-b", "user-0", "k")
    counter = Keys().principal_rate("app-a", int(time.time() // 60))
    assert redis_client.get(counter) == b"2" and 0 < redis_client.ttl(counter) <= 120


async def test_idempotency_keys_and_records_are_the_principals(make_store: Any) -> None:
    store = make_store(rate_limit_per_minute=0)
    rid = ids(await logged(store))[0]
    thumbs = rater(store, rid)
    a = await thumbs("app-a", "u", "same-key")
    b = await thumbs("app-b", "u", "same-key")
    assert not b.duplicate and b.feedback_id != a.feedback_id
    assert (await thumbs("app-a", "u", "same-key")).duplicate
    fa, fb = await store.get_feedback(a.feedback_id), await store.get_feedback(b.feedback_id)
    assert fa is not None and fb is not None
    assert (fa.principal, fa.user_id, fb.principal) == ("app-a", "u", "app-b")
    assert fa.to_dict()["principal"] == "app-a"
    # Without a principal (authentication off) the keys are the ones from before principals.
    anon = await thumbs("", "u", "same-key")
    assert (await store.get_feedback(anon.feedback_id)).principal == ""  # type: ignore[union-attr]
    assert Keys().idempotency("u", "same-key") == "il:idem:1:u:same-key"
    assert Keys().rate("u", 7) == "il:rl:1:u:7"


async def test_completion_record_names_its_principal(make_store: Any) -> None:
    store = make_store()
    rec = make_completion(2)
    rec = CompletionRecord.from_dict({**rec.to_dict(), "principal": "app-a"})
    await store.log_completion(rec)
    got = await store.get_completion(rec.completion_id)
    assert got is not None and got.principal == "app-a"
    old = {k: v for k, v in rec.to_dict().items() if k != "principal"}  # logged before
    assert CompletionRecord.from_dict(old).principal == ""
