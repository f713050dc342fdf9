"""Errors and per-call metrics of the HTTP API.

The routes raise the same `RpcFailure` (serving/errors.py) as the gRPC services, from the same
code; here it becomes the HTTP status of Google's gRPC-to-HTTP mapping and OpenAI's error body,
`{"error": {"message", "type", "param", "code"}}`: `type` names the error as the openai SDK's
exception classes do, `code` is the gRPC status the same error gets over gRPC (lower case).
Every call is counted in the gRPC server's series (`instructloop_requests_total` and its
siblings) under its route's path as `rpc` and the gRPC status name as `code`, so the error-rate
alerts cover both transports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from instructloop.serving.errors import RpcFailure
from instructloop.serving.metrics import ServerMetrics

log = logging.getLogger("instructloop.serving.http")

S = grpc.StatusCode
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    S.OK: 200,
    S.INVALID_ARGUMENT: 400,
    S.FAILED_PRECONDITION: 400,
    S.OUT_OF_RANGE: 400,
    S.UNAUTHENTICATED: 401,
    S.PERMISSION_DENIED: 403,
    S.NOT_FOUND: 404,
    S.ALREADY_EXISTS: 409,
    S.ABORTED: 409,
    S.RESOURCE_EXHAUSTED: 429,
    S.CANCELLED: 499,
    S.UNIMPLEMENTED: 501,
    S.UNAVAILABLE: 503,
    S.DEADLINE_EXCEEDED: 504,
}
"""gRPC status -> HTTP status (google.rpc's mapping); anything else is 500."""
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "BadRequestError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}
"""OpenAI's error `type`, named as vLLM's server names it (the openai SDK's exception class)."""


class HttpFailure(RpcFailure):
    """An RpcFailure of the HTTP side that can name the request field at fault (`param`) or
    needs an HTTP status of its own (`http_status`, e.g. 413 for a body over the limit)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        param: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(code, message)
        self.param = param
        self.http_status = http_status


def bad_param(param: str, message: str) -> HttpFailure:
    return HttpFailure(S.INVALID_ARGUMENT, message, param=param)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "Error"),
            "param": param,
            "code": code,
        }
    }


def failure_status(e: RpcFailure) -> int:
    if isinstance(e, HttpFailure) and e.http_status is not None:
        return e.http_status
    return HTTP_STATUS.get(e.code, 500)


def failure_body(e: RpcFailure) -> dict[str, Any]:
    param = e.param if isinstance(e, HttpFailure) else None
    return error_body(failure_status(e), e.message, e.code.name.lower(), param)


def failure_response(e: RpcFailure) -> Response:
    """The error body with its status; a failure that knows when a retry may succeed (a quota,
    a rate limit) also says so in `Retry-After`, which the openai SDK honours."""
    retry = getattr(e, "retry_after_s", None)
    headers = None if retry is None else {"retry-after": str(max(1, math.ceil(retry)))}
    return json_response(failure_body(e), failure_status(e), headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def validation_failure(e: Any) -> HttpFailure:
    """A request body that does not have the expected shape (pydantic's errors, or FastAPI's
    RequestValidationError): INVALID_ARGUMENT naming the first field at fault."""
    errors = e.errors()
    if not errors:
        return HttpFailure(S.INVALID_ARGUMENT, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return HttpFailure(
        S.INVALID_ARGUMENT, f"{where}{first.get('msg', 'invalid')}{more}", param=param
    )


def install_handlers(app: Any) -> None:
    """OpenAI's error body for what FastAPI itself refuses (unknown route, wrong method, a body
    its own validation rejects) and for an RpcFailure that leaves a route."""

    async def on_rpc_failure(_request: Request, e: Exception) -> Response:
        assert isinstance(e, RpcFailure)
        return failure_response(e)

    async def on_validation(_request: Request, e: Exception) -> Response:
        return failure_response(validation_failure(e))

    async def on_http(_request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        code = {404: "not_found", 405: "unimplemented"}.get(e.status_code, "unknown")
        return json_response(error_body(e.status_code, str(e.detail), code), e.status_code)

    app.add_exception_handler(RpcFailure, on_rpc_failure)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)


def _code_of(err: BaseException) -> grpc.StatusCode:
    if isinstance(err, RpcFailure):
        return err.code
    if isinstance(err, asyncio.CancelledError | GeneratorExit):
        return S.CANCELLED
    return S.INTERNAL


def sse_event(body: Any) -> bytes:
    """One server-sent event of a stream: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class RouteCalls:
    """One route's per-call metrics, as RpcGuard keeps them for an RPC: in flight, latency,
    calls by status. A streamed answer is counted until its last event."""

    def __init__(self, metrics: ServerMetrics, route: str) -> None:
        self.route = route
        self._requests = metrics.requests
        self._in_flight = metrics.in_flight.labels(route)
        self._latency = metrics.request_latency.labels(route)
        self._ok = metrics.requests.labels(route, S.OK.name)

    def _finish(self, t0: float, err: BaseException | None) -> None:
        self._in_flight.dec()
        self._latency.observe(time.monotonic() - t0)
        if err is None:
            self._ok.inc()
            return
        code = _code_of(err)
        self._requests.labels(self.route, code.name).inc()
        if code is S.INTERNAL:
            log.error("%s failed", self.route, exc_info=err)

    async def call(self, handler: Callable[[], Awaitable[Response]]) -> Response:
        """Run `handler`: an RpcFailure becomes its error response, anything else a 500. A
        StreamingResponse's body is counted until it ends, and an error inside it is sent as
        an `error` event before `[DONE]` (as vLLM does; the openai SDK raises it)."""
        t0 = time.monotonic()
        self._in_flight.inc()
        try:
            resp = await handler()
        except BaseException as e:
            self._finish(t0, e)
            if isinstance(e, RpcFailure):
                return failure_response(e)
            if isinstance(e, Exception):
                return json_response(error_body(500, f"internal error: {e}", "internal"), 500)
            raise
        if isinstance(resp, StreamingResponse):
            resp.body_iterator = self._stream(resp.body_iterator, t0)
        else:
            self._finish(t0, None)
        return resp

    async def _stream(self, body: AsyncIterator[Any], t0: float) -> AsyncIterator[bytes]:
        err: BaseException | None = None
        try:
            async for part in body:
                yield part
        except RpcFailure as e:
            err = e
            yield sse_event(failure_body(e))
            yield SSE_DONE
        except Exception as e:
            err = e
            yield sse_event(error_body(500, f"internal error: {e}", "internal"))
            yield SSE_DONE
        except BaseException as e:  # cancelled: the client went away
            err = e
            raise
        finally:
            aclose = getattr(body, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:  # counted even if the close is cancelled too
                self._finish(t0, err)
