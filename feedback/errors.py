"""Errors of the feedback store.

grpc stays out of this package: each class names the gRPC status code the server should answer
with (`grpc_code_name`, a `grpc.StatusCode` member name), so the mapping is one line there:
`getattr(grpc.StatusCode, err.grpc_code_name)`.
"""

from __future__ import annotations


class FeedbackError(Exception):
    """Base class; its message is meant for the API caller."""

    grpc_code_name: str = "INTERNAL"


class InvalidFeedback(FeedbackError):
    """The request is malformed or inconsistent (e.g. ids of different completions)."""

    grpc_code_name = "INVALID_ARGUMENT"


class InvalidRecord(FeedbackError):
    """A completion record (or its metadata) that cannot be stored as it is."""

    grpc_code_name = "INVALID_ARGUMENT"


class NotFound(FeedbackError):
    """A referenced completion or response was never logged, or has expired."""

    grpc_code_name = "NOT_FOUND"


class IdempotencyConflict(FeedbackError):
    """The idempotency key was already used by this user for a different judgement."""

    grpc_code_name = "ALREADY_EXISTS"

    def __init__(self, message: str, *, feedback_id: str) -> None:
        super().__init__(message)
        self.feedback_id = feedback_id


class RateLimited(FeedbackError):
    """The user, or its principal, has used up its feedback rate limit for the current window.
    `scope`: "user" or "principal"."""

    grpc_code_name = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, retry_after_s: float, scope: str = "user", principal: str = ""
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.scope = scope
        self.principal = principal


class StoreUnavailable(FeedbackError):
    """Redis could not be reached or did not answer in time; nothing was acknowledged."""

    grpc_code_name = "UNAVAILABLE"


class ExportError(FeedbackError):
    """An export could not be made (bad target directory, unknown snapshot, ...)."""

    grpc_code_name = "FAILED_PRECONDITION"
