"""Feedback routes: `POST /v1/feedback/rankings`, `/comparisons` and `/ratings`, JSON bodies
with the fields of feedback.proto's requests. Each becomes the gRPC request and goes through
FeedbackService's own method, so validation, rate limits and idempotency are the gRPC API's.
An `Idempotency-Key` header stands in for a body without `idempotency_key`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from instructloop.serving.feedback_service import SERVICE_NAME
from instructloop.serving.openai.errors import RouteCalls, json_response
from instructloop.serving.openai.parts import ApiParts, authorize, read_body
from instructloop.serving.openai.schemas import (
    ComparisonRequest,
    RankingRequest,
    RatingRequest,
)
from instructloop.v1 import feedback_pb2

Shape = type[RankingRequest] | type[ComparisonRequest] | type[RatingRequest]
Submit = Callable[[Any, Any], Awaitable[feedback_pb2.FeedbackAck]]


def router(parts: ApiParts) -> APIRouter:
    r = APIRouter()
    service = parts.feedback
    routes: list[tuple[str, Shape, str, Submit]] = [
        ("/v1/feedback/rankings", RankingRequest, "SubmitRanking", service.SubmitRanking),
        ("/v1/feedback/comparisons", ComparisonRequest, "SubmitComparison",
         service.SubmitComparison),
        ("/v1/feedback/ratings", RatingRequest, "SubmitRating", service.SubmitRating),
    ]  # fmt: skip
    for path, shape, rpc, submit in routes:
        method = f"/{SERVICE_NAME}/{rpc}"  # the keys that may call it may call this route
        r.add_api_route(path, _endpoint(parts, path, shape, method, submit), methods=["POST"])
    return r


def _endpoint(
    parts: ApiParts, path: str, shape: Shape, method: str, submit: Submit
) -> Callable[[Request], Awaitable[Response]]:
    calls = RouteCalls(parts.metrics, path)

    async def handle(request: Request) -> Response:
        authorize(parts, request, method)
        body = await read_body(request, shape, parts.config.max_receive_message_bytes)
        if not body.idempotency_key:
            body.idempotency_key = request.headers.get("idempotency-key", "")
        # The servicer's method itself; it reads nothing of the gRPC context.
        ack = await submit(body.to_proto(), None)
        return json_response(
            {
                "feedback_id": ack.feedback_id,
                "duplicate": ack.duplicate,
                "created": ack.created.seconds,
            }
        )

    async def endpoint(request: Request) -> Response:
        return await calls.call(lambda: handle(request))

    return endpoint
