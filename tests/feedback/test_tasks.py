"""The labelling task queue against the real Redis: tasks made once from the completion log,
leases (one labeller at a time, lapsed leases come back), labels stored as ordinary ranking
and rating records, skip and flag, labels per task, the agreement between labellers, and bad
input refused with nothing stored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import IdempotencyConflict, InvalidFeedback, NotFound
from instructloop.feedback.export import export_snapshot
from instructloop.feedback.keys import LabelKeys
from instructloop.feedback.records import CompletionRecord
from instructloop.feedback.store import FeedbackStore
from instructloop.feedback.tasks import Labeller, NotLeased, TaskConfig, TaskQueue
from tests.support.records import make_completion
from tests.support.redis_state import db_state

ALICE = Labeller("alice")
BOB = Labeller("bob")
CAROL = Labeller("carol")
K = LabelKeys()


@pytest.fixture
async def store(redis_client: Any, redis_url: str) -> AsyncIterator[FeedbackStore]:
    s = FeedbackStore.from_url(redis_url, StoreConfig(rate_limit_per_minute=0))
    yield s
    await s.close()


def queue(store: FeedbackStore, **kw: Any) -> TaskQueue:
    return TaskQueue(store, TaskConfig(**kw))


async def logged(store: FeedbackStore, k: int = 4, **kw: Any) -> CompletionRecord:
    rec = make_completion(k, **kw)
    await store.log_completion(rec)
    return rec


def rankings(client: Any) -> list[dict[str, Any]]:
    """Every stored feedback record (fb:*) as a dict, data merged in."""
    out = []
    for key in client.keys("il:fb:*"):
        h = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        out.append({**h, **json.loads(h["data"])})
    return out


# -- tasks from the completion log ------------------------------------------------------------


async def test_completions_with_two_or_more_responses_become_tasks_once(
    store: FeedbackStore, redis_client: Any
) -> None:
    q = queue(store)
    one = await logged(store, 1)
    two = await logged(store, 2)
    four = await logged(store, 4)
    await q.refresh()
    await q.refresh()
    await store.log_completion(four)  # a retried log write adds no log entry, so no new task
    await q.refresh()
    assert [m.decode() for m in redis_client.zrange(K.queue, 0, -1)] == [
        two.completion_id,
        four.completion_id,
    ]
    assert not redis_client.exists(K.task(one.completion_id))
    task = redis_client.hgetall(K.task(four.completion_id))
    assert json.loads(task[b"responses"]) == [r.response_id for r in four.responses]
    stats = await q.stats()
    assert (stats.tasks, stats.available, stats.leased) == (2, 2, 0)


async def test_ingest_reads_the_log_in_batches(store: FeedbackStore) -> None:
    q = queue(store, ingest_batch=3)
    recs = [await logged(store, 2) for _ in range(8)]
    # one call per batch inside next_task: the whole log is read before "nothing for you"
    got = await q.next_task(ALICE)
    assert got is not None and got.task_id == recs[0].completion_id
    assert (await q.stats()).tasks == 8


# -- leases -----------------------------------------------------------------------------------


async def test_lease_goes_to_one_labeller_at_a_time(store: FeedbackStore) -> None:
    q = queue(store)
    first, second = await logged(store), await logged(store)
    a = await q.next_task(ALICE)
    b = await q.next_task(BOB)
    assert a is not None and b is not None
    assert (a.task_id, b.task_id) == (first.completion_id, second.completion_id)
    assert await q.next_task(CAROL) is None  # both leased
    # asking again returns the lease one already holds (a reloaded page), not a new task
    again = await q.next_task(ALICE)
    assert again is not None and (again.task_id, again.lease_id) == (a.task_id, a.lease_id)
    assert again.order == a.order  # the same shown order for the same lease
    assert sorted(a.order) == sorted(r.response_id for r in first.responses)
    assert a.completion == first
    stats = await q.stats()
    assert (stats.available, stats.leased) == (0, 2)


async def test_concurrent_labellers_never_share_a_task(store: FeedbackStore) -> None:
    q = queue(store)
    for _ in range(6):
        await logged(store, 2)
    who = [Labeller(f"l{i}") for i in range(10)]
    tasks = await asyncio.gather(*(q.next_task(w) for w in who))
    got = [t.task_id for t in tasks if t is not None]
    assert len(got) == 6 and len(set(got)) == 6


async def test_a_lapsed_lease_returns_the_task(store: FeedbackStore, redis_client: Any) -> None:
    q = queue(store, lease_s=0.3)
    rec = await logged(store)
    a = await q.next_task(ALICE)
    assert a is not None
    assert await q.next_task(BOB) is None
    await asyncio.sleep(0.4)
    b = await q.next_task(BOB)
    assert b is not None and b.task_id == rec.completion_id and b.lease_id != a.lease_id
    # Alice's lapsed lease stores nothing
    before = db_state(redis_client)
    with pytest.raises(NotLeased, match="not leased to you"):
        await q.submit(ALICE, task_id=a.task_id, lease_id=a.lease_id, ranked_response_ids=a.order)
    assert db_state(redis_client) == before
    assert (await q.stats()).lapsed == 1


async def test_submit_after_the_lease_lapsed_is_refused(
    store: FeedbackStore, redis_client: Any
) -> None:
    q = queue(store, lease_s=0.2)
    await logged(store)
    a = await q.next_task(ALICE)
    assert a is not None
    await asyncio.sleep(0.3)
    before = db_state(redis_client)
    with pytest.raises(NotLeased, match="lapsed"):
        await q.submit(ALICE, task_id=a.task_id, lease_id=a.lease_id, ranked_response_ids=a.order)
    assert db_state(redis_client) == before


# -- labels -----------------------------------------------------------------------------------


async def test_a_label_is_a_ranking_and_a_rating(store: FeedbackStore, redis_client: Any) -> None:
    q = queue(store)
    rec = await logged(store)
    t = await q.next_task(Labeller("team", "dana"))
    assert t is not None and t.labels_needed == 1 and t.labels_done == 0
    order = [t.order[2], t.order[0], t.order[3], t.order[1]]
    ack = await q.submit(
        Labeller("team", "dana"),
        task_id=t.task_id,
        lease_id=t.lease_id,
        ranked_response_ids=order,
        ranks=[1, 1, 2, 3],
        rating=6,
        comment="the first two are equally good",
    )
    assert not ack.duplicate and ack.labels_done == 1 and ack.rating_feedback_id
    ranking = await store.get_feedback(ack.feedback_id)
    assert ranking is not None
    assert (ranking.kind, ranking.completion_id) == ("ranking", rec.completion_id)
    assert (ranking.response_ids, ranking.ranks) == (order, [1, 1, 2, 3])
    assert (ranking.user_id, ranking.principal) == ("dana", "team")
    assert ranking.idempotency_key == f"label-{t.lease_id}"
    rating = await store.get_feedback(ack.rating_feedback_id)
    assert rating is not None
    assert (rating.response_id, rating.scale, rating.score) == (order[0], "likert7", 6)
    # the task is done (R = 1) and left the queue; the comment is kept with the label
    task = {k.decode(): v.decode() for k, v in redis_client.hgetall(K.task(t.task_id)).items()}
    assert task["state"] == "done" and task["labels"] == "1"
    label = json.loads(task[f"end:{t.lease_id}"])
    assert label["comment"] == "the first two are equally good"
    assert label["feedback_id"] == ack.feedback_id and label["labeller"] == "team/dana"
    stats = await q.stats()
    assert (stats.available, stats.leased, stats.done, stats.labels) == (0, 0, 1, 1)
    assert stats.labels_last_hour == 1
    assert stats.labellers["team/dana"].labels == 1
    assert await q.next_task(ALICE) is None


async def test_double_submit_stores_one_ranking(store: FeedbackStore, redis_client: Any) -> None:
    q = queue(store)
    await logged(store)
    t = await q.next_task(ALICE)
    assert t is not None

    def submit(**kw: Any) -> Any:
        return q.submit(
            ALICE, task_id=t.task_id, lease_id=t.lease_id, ranked_response_ids=t.order, **kw
        )

    first, second = await asyncio.gather(submit(rating=5), submit(rating=5))
    assert {first.duplicate, second.duplicate} == {False, True}
    assert first.feedback_id == second.feedback_id
    third = await submit(rating=5)  # after the lease ended: the first answer again
    assert third.duplicate and third.feedback_id == first.feedback_id
    assert third.rating_feedback_id == first.rating_feedback_id
    kinds = sorted(r["kind"] for r in rankings(redis_client))
    assert kinds == ["ranking", "rating"]
    assert (await q.stats()).labels == 1
    # the same lease for another judgement is a conflict, and stores nothing
    before = db_state(redis_client)
    with pytest.raises(IdempotencyConflict, match="different label"):
        await submit(rating=2)
    assert db_state(redis_client) == before


async def test_the_first_writer_is_not_the_duplicate(store: FeedbackStore) -> None:
    """Two submits of one lease, the first to store the ranking the last to count it: the
    store's word decides which answer says duplicate."""
    q = queue(store)
    await logged(store)
    t = await q.next_task(ALICE)
    assert t is not None
    write = store.submit_ranking
    b_done = asyncio.Event()
    calls = 0

    async def held_after_the_first_write(**kw: Any) -> Any:
        nonlocal calls
        calls += 1
        first = calls == 1
        ack = await write(**kw)
        if first:
            await b_done.wait()
        return ack

    store.submit_ranking = held_after_the_first_write  # type: ignore[method-assign]

    def submit() -> Any:
        return q.submit(ALICE, task_id=t.task_id, lease_id=t.lease_id, ranked_response_ids=t.order)

    a_task = asyncio.create_task(submit())
    while calls == 0:
        await asyncio.sleep(0.01)
    b = await submit()  # stores nothing new, counts the label
    b_done.set()
    a = await a_task
    assert (a.duplicate, b.duplicate) == (False, True)
    assert a.feedback_id == b.feedback_id and b.labels_done == 1
    assert (await q.stats()).labels == 1


async def test_bad_labels_are_refused_and_store_nothing(
    store: FeedbackStore, redis_client: Any
) -> None:
    q = queue(store, max_comment_chars=50)
    other = await logged(store)
    await logged(store)
    t = await q.next_task(ALICE)
    b = await q.next_task(BOB)
    assert t is not None and b is not None
    before = db_state(redis_client)
    forged = [*t.order[:3], "resp-forged"]
    foreign = [*t.order[:3], b.order[0]]
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"ranked_response_ids": forged}, InvalidFeedback, "not a candidate"),
        ({"ranked_response_ids": foreign}, InvalidFeedback, "not a candidate"),
        ({"ranked_response_ids": t.order[:3]}, InvalidFeedback, "rank every candidate"),
        ({"ranked_response_ids": [*t.order, t.order[0]]}, InvalidFeedback, "more than once"),
        ({"ranks": [1, 3, 4, 5]}, InvalidFeedback, "dense"),
        ({"comment": "x" * 51}, InvalidFeedback, "at most 50"),
        ({"rating": 8}, InvalidFeedback, "1 \\(worst\\) to 7"),
        ({"lease_id": b.lease_id}, NotLeased, "not leased to you"),
        ({"lease_id": "lease-nope"}, NotLeased, "not leased to you"),
        ({"task_id": b.task_id, "lease_id": b.lease_id}, NotLeased, "not leased to you"),
        ({"task_id": "cmpl-unknown"}, NotFound, "unknown"),
        ({"lease_id": ""}, InvalidFeedback, "lease_id is required"),
    ]
    for change, error, message in cases:
        kw: dict[str, Any] = {
            "task_id": t.task_id,
            "lease_id": t.lease_id,
            "ranked_response_ids": t.order,
            **change,
        }
        with pytest.raises(error, match=message):
            await q.submit(ALICE, **kw)
    # Bob's own task, ranked with Bob's ids under Alice's name: not hers
    with pytest.raises(NotLeased):
        await q.submit(ALICE, task_id=b.task_id, lease_id=b.lease_id, ranked_response_ids=b.order)
    assert db_state(redis_client) == before
    assert other.completion_id == t.task_id


# -- skip and flag ----------------------------------------------------------------------------


async def test_skip_gives_the_task_to_others_only(store: FeedbackStore) -> None:
    q = queue(store)
    first, second = await logged(store), await logged(store)
    a = await q.next_task(ALICE)
    assert a is not None and a.task_id == first.completion_id
    assert await q.skip(ALICE, task_id=a.task_id, lease_id=a.lease_id)
    assert not await q.skip(ALICE, task_id=a.task_id, lease_id=a.lease_id)  # a repeat
    with pytest.raises(NotLeased, match="already ended"):
        await q.submit(ALICE, task_id=a.task_id, lease_id=a.lease_id, ranked_response_ids=a.order)
    nxt = await q.next_task(ALICE)
    assert nxt is not None and nxt.task_id == second.completion_id
    b = await q.next_task(BOB)
    assert b is not None and b.task_id == first.completion_id  # back in its old place
    stats = await q.stats()
    assert stats.skips == 1


async def test_flag_takes_the_task_out(store: FeedbackStore, redis_client: Any) -> None:
    q = queue(store)
    await logged(store)
    a = await q.next_task(ALICE)
    assert a is not None
    before = db_state(redis_client)
    with pytest.raises(InvalidFeedback, match="unknown flag reason"):
        await q.flag(ALICE, task_id=a.task_id, lease_id=a.lease_id, reason="boring")
    with pytest.raises(NotLeased):
        await q.flag(BOB, task_id=a.task_id, lease_id=a.lease_id, reason="unsafe")
    assert db_state(redis_client) == before
    assert await q.flag(
        ALICE, task_id=a.task_id, lease_id=a.lease_id, reason="unsafe", comment="harmful"
    )
    assert await q.next_task(BOB) is None
    stats = await q.stats()
    assert (stats.flagged, stats.available, stats.flags_by_reason) == (1, 0, {"unsafe": 1})
    flag = json.loads(redis_client.hget(K.task(a.task_id), "flag"))
    assert (flag["reason"], flag["comment"], flag["labeller"]) == ("unsafe", "harmful", "alice")


# -- several labels per task, agreement -------------------------------------------------------


async def test_labels_per_task_and_agreement(store: FeedbackStore, redis_client: Any) -> None:
    q = queue(store, labels_per_task=3)
    rec = await logged(store)
    a, b, c, d = (r.response_id for r in rec.responses)

    async def label(who: Labeller, order: list[str], ranks: list[int] | None = None) -> int:
        t = await q.next_task(who)
        assert t is not None and t.task_id == rec.completion_id
        ack = await q.submit(
            who, task_id=t.task_id, lease_id=t.lease_id, ranked_response_ids=order, ranks=ranks
        )
        return ack.labels_done

    assert await label(ALICE, [a, b, c, d]) == 1
    assert await q.next_task(ALICE) is None  # labelled it already; back in the queue for others
    assert (await q.stats()).available == 1
    assert await label(BOB, [a, b, d, c]) == 2  # 5 of 6 pairs as Alice
    # Carol ties a and b: that pair is no judgement; of the other 5 pairs she agrees with
    # Alice on all 5 and with Bob on 4
    assert await label(CAROL, [a, b, c, d], [1, 1, 2, 3]) == 3
    stats = await q.stats()
    assert (stats.done, stats.available, stats.labels) == (1, 0, 3)
    assert (stats.pairs_judged, stats.pairs_agreed) == (6 + 5 + 5, 5 + 5 + 4)
    assert stats.agreement == pytest.approx(14 / 16)
    assert stats.labellers["alice"].pairs_judged == 11
    assert stats.labellers["alice"].agreement == pytest.approx(10 / 11)
    assert stats.labellers["carol"].agreement == pytest.approx(9 / 10)
    records = [r for r in rankings(redis_client) if r["kind"] == "ranking"]
    assert sorted(r["user_id"] for r in records) == ["alice", "bob", "carol"]


async def test_rankings_of_labels_are_exported(
    store: FeedbackStore, redis_url: str, tmp_path: Path
) -> None:
    q = queue(store)
    await logged(store)
    t = await q.next_task(ALICE)
    assert t is not None
    ack = await q.submit(
        ALICE, task_id=t.task_id, lease_id=t.lease_id, ranked_response_ids=t.order,
        ranks=[1, 2, 2, 3],
    )  # fmt: skip
    export_snapshot(redis_url, tmp_path / "snap")
    rows = [json.loads(line) for line in (tmp_path / "snap" / "rankings.jsonl").open()]
    assert [(r["feedback_id"], r["response_ids"], r["ranks"]) for r in rows] == [
        (ack.feedback_id, t.order, [1, 2, 2, 3])
    ]


async def test_expired_completions_leave_the_queue(store: FeedbackStore, redis_client: Any) -> None:
    q = queue(store)
    gone, kept = await logged(store), await logged(store)
    await q.refresh()
    redis_client.delete(f"il:cmpl:{gone.completion_id}")  # as its TTL would
    t = await q.next_task(ALICE)
    assert t is not None and t.task_id == kept.completion_id
    assert (await q.stats()).expired == 1


def test_config_is_checked() -> None:
    for bad in ({"lease_s": 0}, {"labels_per_task": 0}, {"scan_max": 0}):
        with pytest.raises(ValueError):
            TaskConfig(**bad)  # type: ignore[arg-type]
