"""FeedbackService over gRPC on completions the server really produced: each kind is stored,
idempotency keys make resubmissions count once, bad feedback is refused and stores nothing,
and the per-user rate limit answers RESOURCE_EXHAUSTED."""

from __future__ import annotations

import grpc
import pytest
import redis

from instructloop.v1 import completion_pb2, feedback_pb2
from tests.support.redis_state import redis_state
from tests.support.rpc import chat, rpc_error, small_completion, stubs
from tests.support.server import Served, running_server

pytestmark = pytest.mark.engine


def _stats(client: redis.Redis) -> dict[str, int]:
    return {k: int(v) for k, v in client.hgetall("il:stats").items()}


async def test_each_kind_is_stored(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    c = await small_completion(served, channel)
    a, b, d = (ch.response_id for ch in c.choices)
    md = served.user_md

    ranking = await s.feedback.SubmitRanking(
        feedback_pb2.SubmitRankingRequest(
            user_id="rater", completion_id=c.completion_id, ranked_response_ids=[b, a, d],
            ranks=[1, 1, 2],
        ),
        metadata=md,
    )  # fmt: skip
    comparison = await s.feedback.SubmitComparison(
        feedback_pb2.SubmitComparisonRequest(
            user_id="rater", chosen_response_id=a, rejected_response_id=d
        ),
        metadata=md,
    )
    rating = await s.feedback.SubmitRating(
        feedback_pb2.SubmitRatingRequest(
            user_id="rater", response_id=b, scale=feedback_pb2.RATING_SCALE_LIKERT_7, score=6
        ),
        metadata=md,
    )
    thumb = await s.feedback.SubmitRating(
        feedback_pb2.SubmitRatingRequest(
            user_id="rater", response_id=d, scale=feedback_pb2.RATING_SCALE_THUMB, score=-1
        ),
        metadata=md,
    )
    for ack in (ranking, comparison, rating, thumb):
        assert ack.feedback_id.startswith("fb-") and not ack.duplicate
        assert ack.created.seconds > 0
    h = serving_redis.hgetall(f"il:fb:{ranking.feedback_id}")
    assert h["kind"] == "ranking" and h["completion_id"] == c.completion_id
    assert h["user_id"] == "rater"
    assert '"ranks":[1,1,2]' in h["data"] and b in h["data"]
    h = serving_redis.hgetall(f"il:fb:{comparison.feedback_id}")
    assert h["kind"] == "comparison" and h["completion_id"] == c.completion_id
    h = serving_redis.hgetall(f"il:fb:{rating.feedback_id}")
    assert h["kind"] == "rating" and '"score":6' in h["data"] and '"likert7"' in h["data"]
    h = serving_redis.hgetall(f"il:fb:{thumb.feedback_id}")
    assert '"score":-1' in h["data"] and '"thumb"' in h["data"]


async def test_idempotency_key_counts_once(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    c = await small_completion(served, channel, n=2)
    a, b = (ch.response_id for ch in c.choices)
    md = served.user_md
    req = feedback_pb2.SubmitComparisonRequest(
        user_id="idem-user", idempotency_key="k-1", chosen_response_id=a, rejected_response_id=b
    )
    before = _stats(serving_redis).get("feedback:comparison", 0)
    first = await s.feedback.SubmitComparison(req, metadata=md)
    again = await s.feedback.SubmitComparison(req, metadata=md)
    assert not first.duplicate and again.duplicate
    assert again.feedback_id == first.feedback_id and again.created == first.created
    assert _stats(serving_redis)["feedback:comparison"] == before + 1
    # The same key for a different judgement is a conflict, and changes nothing.
    state = redis_state(serving_redis)
    err = await rpc_error(
        s.feedback.SubmitComparison(
            feedback_pb2.SubmitComparisonRequest(
                user_id="idem-user", idempotency_key="k-1", chosen_response_id=b,
                rejected_response_id=a,
            ),
            metadata=md,
        )
    )  # fmt: skip
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and first.feedback_id in err.details()
    assert redis_state(serving_redis) == state
    # Another user may use the same key.
    other = await s.feedback.SubmitComparison(
        feedback_pb2.SubmitComparisonRequest(
            user_id="someone-else", idempotency_key="k-1", chosen_response_id=a,
            rejected_response_id=b,
        ),
        metadata=md,
    )  # fmt: skip
    assert not other.duplicate and other.feedback_id != first.feedback_id


async def test_bad_feedback_is_refused_and_stores_nothing(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    md = served.user_md
    c1 = await small_completion(served, channel, n=3)
    c2 = await small_completion(served, channel, n=2)
    a, b, d = (ch.response_id for ch in c1.choices)
    x, _ = (ch.response_id for ch in c2.choices)
    unknown = "resp-" + "0" * 32
    Cmp, Rnk, Rat = (
        feedback_pb2.SubmitComparisonRequest,
        feedback_pb2.SubmitRankingRequest,
        feedback_pb2.SubmitRatingRequest,
    )
    INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        (s.feedback.SubmitComparison, Cmp(user_id="u", chosen_response_id=a,
                                          rejected_response_id=x), INV, "different completions"),
        (s.feedback.SubmitComparison, Cmp(user_id="u", chosen_response_id=a,
                                          rejected_response_id=a), INV, "twice"),
        (s.feedback.SubmitComparison, Cmp(user_id="u", chosen_response_id=a,
                                          rejected_response_id=unknown), NF, unknown),
        (s.feedback.SubmitComparison, Cmp(chosen_response_id=a, rejected_response_id=b), INV,
         "user_id"),
        (s.feedback.SubmitRanking, Rnk(user_id="u", completion_id=c1.completion_id,
                                       ranked_response_ids=[a, b, a]), INV, "more than once"),
        (s.feedback.SubmitRanking, Rnk(user_id="u", completion_id=c1.completion_id,
                                       ranked_response_ids=[a, x]), INV, x),
        (s.feedback.SubmitRanking, Rnk(user_id="u", completion_id="cmpl-" + "0" * 32,
                                       ranked_response_ids=[a, b]), NF, "cmpl-"),
        (s.feedback.SubmitRanking, Rnk(user_id="u", completion_id=c1.completion_id,
                                       ranked_response_ids=[a]), INV, "at least 2"),
        (s.feedback.SubmitRanking, Rnk(user_id="u", completion_id=c1.completion_id,
                                       ranked_response_ids=[a, b, d], ranks=[1, 3, 3]), INV,
         "dense"),
        (s.feedback.SubmitRating, Rat(user_id="u", response_id=a), INV, "scale is required"),
        (s.feedback.SubmitRating, Rat(user_id="u", response_id=a,
                                      scale=feedback_pb2.RATING_SCALE_THUMB, score=0), INV,
         "+1 or -1"),
        (s.feedback.SubmitRating, Rat(user_id="u", response_id=a,
                                      scale=feedback_pb2.RATING_SCALE_LIKERT_7, score=8), INV,
         "1 to 7"),
        (s.feedback.SubmitRating, Rat(user_id="u", response_id=unknown,
                                      scale=feedback_pb2.RATING_SCALE_THUMB, score=1), NF,
         unknown),
    ]  # fmt: skip
    before = redis_state(serving_redis)
    for method, req, code, needle in cases:
        err = await rpc_error(method(req, metadata=md))
        assert err.code() == code, (req, err.code(), err.details())
        assert needle in (err.details() or ""), (req, err.details())
    assert redis_state(serving_redis) == before


async def test_feedback_on_unlogged_completion_is_not_found(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """A response of a completion that opted out of logging cannot receive feedback."""
    s = stubs(channel)
    c = await s.completion.Complete(
        chat(("user", "Name a fruit."), n=2, max_tokens=3, disable_logging=True),
        metadata=served.user_md,
    )
    a, b = (ch.response_id for ch in c.choices)
    err = await rpc_error(
        s.feedback.SubmitComparison(
            feedback_pb2.SubmitComparisonRequest(
                user_id="u", chosen_response_id=a, rejected_response_id=b
            ),
            metadata=served.user_md,
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_rate_limit_per_user(served: Served, serving_redis_url: str) -> None:
    """A second server on the same engine, with a limit of 3 feedback records per minute."""
    async with (
        running_server(
            None, serving_redis_url, engine=served.engine, feedback_rate_limit_per_minute=3
        ) as limited,
        grpc.aio.insecure_channel(limited.address) as ch,
    ):
        s = stubs(ch)
        c = await s.completion.Complete(
            completion_pb2.CompletionRequest(prompt="Hi", n=2, max_tokens=2),
            metadata=limited.user_md,
        )
        rid = c.choices[0].response_id

        def rate(user: str, key: str) -> feedback_pb2.SubmitRatingRequest:
            return feedback_pb2.SubmitRatingRequest(
                user_id=user, idempotency_key=key, response_id=rid,
                scale=feedback_pb2.RATING_SCALE_THUMB, score=1,
            )  # fmt: skip

        for i in range(3):
            await s.feedback.SubmitRating(rate("limited", f"k{i}"), metadata=limited.user_md)
        err = await rpc_error(
            s.feedback.SubmitRating(rate("limited", "k3"), metadata=limited.user_md)
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 3" in (err.details() or "")
        # A replay is still answered, and other users are not affected.
        again = await s.feedback.SubmitRating(rate("limited", "k0"), metadata=limited.user_md)
        assert again.duplicate
        await s.feedback.SubmitRating(rate("other-user", "k0"), metadata=limited.user_md)
