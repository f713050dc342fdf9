"""FeedbackService: comparisons, rankings and ratings, handed to the feedback store, which
validates them, rate-limits them (per user within its principal, and per principal) and keeps
them idempotent. Each is stored under the caller's principal (serving/quotas.py:
`current_principal`, bound by the transport)."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc

from instructloop.feedback.errors import FeedbackError, RateLimited
from instructloop.feedback.store import Ack, FeedbackStore
from instructloop.serving.convert import feedback_ack, rating_scale
from instructloop.serving.errors import store_failure
from instructloop.serving.metrics import ServerMetrics
from instructloop.serving.quotas import current_principal
from instructloop.v1 import feedback_pb2, feedback_pb2_grpc

SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


class FeedbackService(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, store: FeedbackStore, metrics: ServerMetrics) -> None:
        self.store = store
        self.metrics = metrics

    async def _submit(self, kind: str, call: Awaitable[Ack]) -> feedback_pb2.FeedbackAck:
        try:
            ack = await call
        except FeedbackError as e:
            if e.grpc_code_name == "UNAVAILABLE":
                self.metrics.redis_write_errors.labels(f"submit_{kind}").inc()
            elif isinstance(e, RateLimited):
                scope = "feedback" if e.scope == "principal" else "feedback_user"
                self.metrics.quota_refusals.labels(e.principal, scope).inc()
            raise store_failure(e) from None
        if ack.duplicate:  # a client's retry, answered with the first ack
            self.metrics.feedback_duplicates.labels(kind).inc()
        else:
            self.metrics.feedback_records.labels(kind).inc()
        return feedback_ack(ack)

    async def SubmitComparison(
        self, request: feedback_pb2.SubmitComparisonRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.FeedbackAck:
        return await self._submit(
            "comparison",
            self.store.submit_comparison(
                principal=current_principal(),
                user_id=request.user_id,
                idempotency_key=request.idempotency_key or None,
                chosen_response_id=request.chosen_response_id,
                rejected_response_id=request.rejected_response_id,
                tie=request.tie,
            ),
        )

    async def SubmitRanking(
        self, request: feedback_pb2.SubmitRankingRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.FeedbackAck:
        return await self._submit(
            "ranking",
            self.store.submit_ranking(
                principal=current_principal(),
                user_id=request.user_id,
                idempotency_key=request.idempotency_key or None,
                completion_id=request.completion_id,
                ranked_response_ids=list(request.ranked_response_ids),
                ranks=list(request.ranks) or None,
            ),
        )

    async def SubmitRating(
        self, request: feedback_pb2.SubmitRatingRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.FeedbackAck:
        scale = rating_scale(request.scale)
        return await self._submit(
            "rating",
            self.store.submit_rating(
                principal=current_principal(),
                user_id=request.user_id,
                idempotency_key=request.idempotency_key or None,
                response_id=request.response_id,
                scale=scale,
                score=int(request.score),
            ),
        )
