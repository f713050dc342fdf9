"""What every route of the HTTP API is given (`ApiParts`: the server's own parts, shared with
the gRPC services), and the steps each begins with: check the key (and bind the caller's
principal), read the body; a completion is also admitted under its principal's quota."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import grpc
from fastapi import Request
from pydantic import BaseModel, ValidationError

from instructloop.serving.auth import Authenticator
from instructloop.serving.completion_service import Completions
from instructloop.serving.config import ServerConfig
from instructloop.serving.engine import Engine
from instructloop.serving.errors import quota_failure
from instructloop.serving.feedback_service import FeedbackService
from instructloop.serving.metrics import ServerMetrics
from instructloop.serving.openai.errors import HttpFailure, validation_failure
from instructloop.serving.quotas import Caller, QuotaExceeded, Quotas, bind
from instructloop.serving.replica import ServedModel

M = TypeVar("M", bound=BaseModel)


@dataclass
class ApiParts:
    """The serving process's parts the routes use: the same objects the gRPC services use."""

    completions: Completions
    feedback: FeedbackService
    auth: Authenticator
    metrics: ServerMetrics
    served: ServedModel
    engine: Engine
    config: ServerConfig
    quotas: Quotas | None = None


DENIALS = {
    "admin": "it needs an admin key",
    "labeller": "it needs a labeller or admin key",
    "labelling-only": "a labeller key calls only the labelling queue",
}
"""Why serving/auth.py refuses a known key, worded for HTTP."""


def authorize(parts: ApiParts, request: Request, method: str) -> str:
    """Check the `Authorization: Bearer` header as the gRPC guard checks the key of `method`
    (`/package.Service/Rpc`, the RPC this route stands for), so both transports allow exactly
    the same keys; bind the caller's principal for the request (serving/quotas.py) as the
    guard does; return the principal. Called before the body is read, so a caller without a
    key costs no parsing."""
    auth = parts.auth
    principal = ""
    if auth.enabled:
        deny, principal = auth.check(
            method, (("authorization", request.headers.get("authorization")),)
        )
        if deny == "key":
            raise HttpFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid API key: send the header `Authorization: Bearer <key>`",
            )
        if deny is not None:
            raise HttpFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this key may not call {request.url.path}: {DENIALS.get(deny, deny)}",
            )
    quotas = parts.quotas
    bind(Caller(principal) if quotas is None else quotas.caller(principal))
    return principal


async def admit_completion(parts: ApiParts, principal: str) -> None:
    """A completion starts only while its principal is under its quotas (the gRPC guard's
    check, the same Redis windows): RESOURCE_EXHAUSTED (429, with Retry-After) otherwise."""
    quotas = parts.quotas
    if quotas is None or not quotas.enabled:
        return
    try:
        await quotas.admit_completion(principal)
    except QuotaExceeded as e:
        raise quota_failure(e) from None


async def read_body(request: Request, shape: type[M], limit: int) -> M:
    """The JSON body as `shape`, at most `limit` bytes (the gRPC side's message limit; a
    bigger body is refused with 413 before it is all read)."""
    too_large = HttpFailure(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the request body is larger than the server's limit of {limit} bytes",
        http_status=413,
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    try:
        return shape.model_validate_json(b"".join(parts))
    except ValidationError as e:
        raise validation_failure(e) from None
