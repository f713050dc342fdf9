"""Where exceptions become gRPC statuses: `RpcFailure` (raised by the services with the status
and message to answer) and `RpcGuard`, which wraps every handler to check the key
(serving/auth.py), turn whatever the handler raised into a status, and count per-RPC metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from instructloop.feedback.errors import FeedbackError
from instructloop.registry import RegistryError
from instructloop.serving.auth import Authenticator
from instructloop.serving.engine_types import EngineRequestError, EngineUnavailable
from instructloop.serving.metrics import ServerMetrics

log = logging.getLogger("instructloop.serving")


class RpcFailure(Exception):
    """Ends an RPC with `code` and `message` (RpcGuard turns it into the status)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def store_failure(e: FeedbackError | RegistryError) -> RpcFailure:
    """The status the feedback store or the registry names for its error."""
    code = getattr(grpc.StatusCode, e.grpc_code_name, grpc.StatusCode.INTERNAL)
    return RpcFailure(code, str(e))


def engine_failure(e: EngineUnavailable | EngineRequestError) -> RpcFailure:
    if isinstance(e, EngineUnavailable):
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, str(e))
    return invalid(f"the engine rejected the request: {e}")


def logging_failure(e: FeedbackError) -> RpcFailure:
    """A completion that could not be logged is not returned: UNAVAILABLE asks for a retry."""
    if e.grpc_code_name == "UNAVAILABLE":
        return RpcFailure(
            grpc.StatusCode.UNAVAILABLE,
            f"the completion could not be logged ({e}); it was not returned, retry",
        )
    return RpcFailure(grpc.StatusCode.INTERNAL, f"logging the completion failed: {e}")


def _denial(kind: str) -> RpcFailure:
    if kind == "admin":
        return RpcFailure(grpc.StatusCode.PERMISSION_DENIED, "ModelService needs an admin key")
    return RpcFailure(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid API key: send metadata `authorization: Bearer <key>`",
    )


def _rpc_name(method: str) -> str:
    return method.rsplit("/", 1)[-1] or method


Finish = Callable[[grpc.aio.ServicerContext, BaseException], Awaitable[None]]


class RpcGuard:
    """Authentication, RpcFailure -> status, and per-RPC metrics, around every handler.

    Each method handler is wrapped once, when its service is registered (`register`), not per
    call: a grpc.aio ServerInterceptor runs its own coroutine chain and handler lookup on every
    RPC, a noticeable share of a small RPC's time (benchmarks/feedback.py). The key is checked
    inside the wrapped handler from the call's metadata.
    """

    def __init__(self, auth: Authenticator, metrics: ServerMetrics) -> None:
        self.auth = auth
        self.metrics = metrics

    def register(self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: Any):
        """`add_FooServicer_to_server(servicer, server)`, with every handler wrapped."""
        add_to_server(servicer, _WrappingRegistrar(server, self))

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return self._wrap_unary(handler, method)
        if handler.unary_stream is not None:
            return self._wrap_stream(handler, method)
        raise TypeError(f"{method}: client-streaming handlers are not guarded (none in our protos)")

    def _refuser(self, method: str) -> Callable[[grpc.aio.ServicerContext], None]:
        """Raises the RpcFailure for a call the key does not allow."""
        auth = self.auth

        def check(context: grpc.aio.ServicerContext) -> None:
            if not auth.enabled:
                return
            deny = auth.refusal(method, context.invocation_metadata())
            if deny is not None:
                raise _denial(deny)

        return check

    def _finisher(self, rpc: str) -> Finish:
        """Counts the call's status and aborts it with that status (cancellations end as they
        are: the client is gone)."""
        requests = self.metrics.requests

        async def finish(context: grpc.aio.ServicerContext, err: BaseException) -> None:
            if isinstance(err, RpcFailure):
                code = err.code
            elif isinstance(err, asyncio.CancelledError):
                remaining = context.time_remaining()
                code = (
                    grpc.StatusCode.DEADLINE_EXCEEDED
                    if remaining is not None and remaining <= 0
                    else grpc.StatusCode.CANCELLED
                )
            else:
                code = grpc.StatusCode.INTERNAL
            requests.labels(rpc, code.name).inc()
            if isinstance(err, RpcFailure):
                await context.abort(err.code, err.message)
            elif not isinstance(err, asyncio.CancelledError):
                log.exception("%s failed", rpc, exc_info=err)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")

        return finish

    def _wrap_unary(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        m, rpc = self.metrics, _rpc_name(method)
        # Labelled children looked up once (each .labels() call takes a lock and a dict lookup).
        in_flight, latency = m.in_flight.labels(rpc), m.request_latency.labels(rpc)
        ok = m.requests.labels(rpc, grpc.StatusCode.OK.name)
        check, finish, inner = self._refuser(method), self._finisher(rpc), handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.monotonic()
            in_flight.inc()
            try:
                check(context)
                resp = await inner(request, context)
            except BaseException as e:
                await finish(context, e)
                raise
            else:
                ok.inc()
                return resp
            finally:
                in_flight.dec()
                latency.observe(time.monotonic() - t0)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        m, rpc = self.metrics, _rpc_name(method)
        in_flight, latency = m.in_flight.labels(rpc), m.request_latency.labels(rpc)
        ok = m.requests.labels(rpc, grpc.StatusCode.OK.name)
        check, finish, inner = self._refuser(method), self._finisher(rpc), handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            t0 = time.monotonic()
            in_flight.inc()
            try:
                check(context)
                async for resp in inner(request, context):
                    yield resp
            except BaseException as e:
                if isinstance(e, GeneratorExit):
                    e = asyncio.CancelledError()
                await finish(context, e)
                raise
            else:
                ok.inc()
            finally:
                in_flight.dec()
                latency.observe(time.monotonic() - t0)

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _WrappingRegistrar:
    """Stands in for the server while a generated `add_*Servicer_to_server` registers a
    service, so that the server receives the guarded handlers only. Generated code registers a
    service twice, as a generic handler and as registered methods (grpcio >= 1.62); both get
    the same wrapped handlers."""

    def __init__(self, server: Any, guard: RpcGuard) -> None:
        self._server = server
        self._guard = guard
        self._wrapped: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def _wrap_all(self, service: str, handlers: dict[str, Any]) -> dict[str, Any]:
        if service not in self._wrapped:
            self._wrapped[service] = {
                name: self._guard.wrap(h, f"/{service}/{name}") for name, h in handlers.items()
            }
        return self._wrapped[service]

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        for g in generic_handlers:
            service = g.service_name()
            handlers = getattr(g, "_method_handlers", None)
            if not isinstance(handlers, dict):
                raise TypeError(f"cannot guard the generic handler of {service}")
            names = {k.rsplit("/", 1)[-1]: v for k, v in handlers.items()}
            wrapped = self._wrap_all(service, names)
            self._server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, wrapped),)
            )

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(service, self._wrap_all(service, handlers))
