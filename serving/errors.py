"""Where exceptions become gRPC statuses: `RpcFailure` (raised by the services with the status
and message to answer) and `RpcGuard`, which stands in front of every handler to check the key
(serving/auth.py) before the request is decoded, refuse a body that does not decode, admit a
completion under its principal's quota (serving/quotas.py), turn whatever the handler raised
into a status, and count per-RPC metrics."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from instructloop.feedback.errors import FeedbackError, RateLimited
from instructloop.registry import RegistryError
from instructloop.serving.auth import Authenticator
from instructloop.serving.engine_types import EngineRequestError, EngineUnavailable
from instructloop.serving.metrics import ServerMetrics
from instructloop.serving.quotas import Caller, QuotaExceeded, Quotas, bind

log = logging.getLogger("instructloop.serving")

UNDECODABLE_WARNING_EVERY_S = 60.0
"""Undecodable request bodies are logged as one warning line per this many seconds at most
(with the count since the last one): a client sending garbage must not flood the log."""


class RpcFailure(Exception):
    """Ends an RPC with `code` and `message` (RpcGuard turns it into the status).
    `retry_after_s`: when a retry may succeed (sent as `retry-after` trailing metadata)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """`retry-after` in whole seconds, as HTTP's header; and `grpc-retry-pushback-ms`,
        which gRPC clients with a retry policy honour."""
        if self.retry_after_s is None:
            return ()
        s = max(1, math.ceil(self.retry_after_s))
        return (("retry-after", str(s)), ("grpc-retry-pushback-ms", str(s * 1000)))


def invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def store_failure(e: FeedbackError | RegistryError) -> RpcFailure:
    """The status the feedback store or the registry names for its error."""
    code = getattr(grpc.StatusCode, e.grpc_code_name, grpc.StatusCode.INTERNAL)
    retry = e.retry_after_s if isinstance(e, RateLimited) else None
    return RpcFailure(code, str(e), retry_after_s=retry)


def quota_failure(e: QuotaExceeded) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after_s=e.retry_after_s)


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
    if kind == "labeller":
        return RpcFailure(
            grpc.StatusCode.PERMISSION_DENIED, "LabelingService needs a labeller or admin key"
        )
    if kind == "labelling-only":
        return RpcFailure(
            grpc.StatusCode.PERMISSION_DENIED, "a labeller key calls only LabelingService"
        )
    return RpcFailure(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid API key: send metadata `authorization: Bearer <key>`",
    )


def _rpc_name(method: str) -> str:
    return method.rsplit("/", 1)[-1] or method


class _Undecodable:
    """What a guarded request deserializer returns for a body that does not parse: the guard
    answers INVALID_ARGUMENT with `reason` instead of grpc's UNKNOWN and logged traceback."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an _Undecodable instead of raising (protobuf raises
    DecodeError for corrupt wire data and for invalid UTF-8 in a string field)."""
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # whatever the parser raises is about these bytes
            return _Undecodable(" ".join(str(e).split()) or type(e).__name__)

    return decode


class _Throttled:
    """At most one warning line per `every_s`, counting the events in between."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = -math.inf
        self._since = 0

    def warn(self, message: str, *args: object) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        log.warning(message + " (%d such requests since the last line)", *args, self._since)
        self._last, self._since = now, 0


Finish = Callable[[grpc.aio.ServicerContext, BaseException], Awaitable[None]]
Admit = Callable[[str], Awaitable[None]]


class RpcGuard(grpc.GenericRpcHandler):
    """Authentication before decoding, undecodable bodies, quotas, RpcFailure -> status and
    per-RPC metrics, for every guarded method.

    The guard is the server's generic RPC handler for the guarded services. grpc.aio looks a
    call's handler up once, before it reads the request, by calling `service()` with the
    method name and the call's metadata; the guard checks the key right there and hands back
    either a refusal, whose deserializer does not touch the body, or the method's handler for
    that principal. That lookup happens on every call anyway, so authenticating in it costs a
    dict lookup and the key comparison, synchronously: no coroutine of its own. A grpc.aio
    ServerInterceptor could end the call as early, but runs each call's lookup through its own
    coroutine chain, a noticeable share of a small RPC's time (benchmarks/feedback.py). The
    services are deliberately not also added as grpcio's "registered methods": the server looks
    those up first, by name alone, and the key would go unchecked.

    Each handler's request deserializer is wrapped so that a body that does not parse becomes
    INVALID_ARGUMENT with a one-line reason (counted under its method; logged as a throttled
    warning line, never a traceback). Handlers are built once per method and principal
    (principals are the operator's configured few) and bind the principal for the request
    (serving/quotas.py: `current_principal`).
    """

    def __init__(
        self, auth: Authenticator, metrics: ServerMetrics, quotas: Quotas | None = None
    ) -> None:
        self.auth = auth
        self.metrics = metrics
        self.quotas = quotas
        self._methods: dict[str, _GuardedMethod] = {}
        self._servers: set[int] = set()
        self._undecodable = _Throttled(UNDECODABLE_WARNING_EVERY_S)

    def register(
        self,
        add_to_server: Callable[[Any, Any], None],
        servicer: Any,
        server: Any,
        *,
        completions: bool = False,
    ) -> None:
        """`add_FooServicer_to_server(servicer, server)`, every handler guarded.
        `completions`: its calls are admitted under the completion quotas."""
        collected = _Collector()
        add_to_server(servicer, collected)
        admit = self._admitter() if completions else None
        for service, handlers in collected.services.items():
            for name, h in handlers.items():
                method = f"/{service}/{name}"
                self._methods[method] = _GuardedMethod(self, method, h, admit)
        if id(server) not in self._servers:
            self._servers.add(id(server))
            server.add_generic_rpc_handlers((self,))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        """The handler of this call: the method's, for the caller's principal, or a refusal."""
        m = self._methods.get(handler_call_details.method)  # type: ignore[attr-defined]
        if m is None:
            return None  # not ours (health, reflection) or unknown: grpc answers UNIMPLEMENTED
        if not self.auth.enabled:
            return m.for_principal("")
        deny, principal = self.auth.check(
            m.method,
            handler_call_details.invocation_metadata,  # type: ignore[attr-defined]
        )
        if deny is not None:
            return m.refusal(deny)
        return m.for_principal(principal)

    def _admitter(self) -> Admit | None:
        quotas = self.quotas
        if quotas is None or not quotas.enabled:
            return None

        async def admit(principal: str) -> None:
            try:
                await quotas.admit_completion(principal)
            except QuotaExceeded as e:
                raise quota_failure(e) from None

        return admit

    def undecodable(self, rpc: str, request: _Undecodable) -> RpcFailure:
        self._undecodable.warn("%s: undecodable request body refused: %s", rpc, request.reason)
        return invalid(f"the request body could not be decoded: {request.reason}")

    def caller(self, principal: str) -> Caller:
        return Caller(principal) if self.quotas is None else self.quotas.caller(principal)

    def finisher(self, rpc: str) -> Finish:
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
                await context.abort(err.code, err.message, err.trailing_metadata)
            elif not isinstance(err, asyncio.CancelledError):
                log.exception("%s failed", rpc, exc_info=err)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")

        return finish


class _GuardedMethod:
    """One guarded method: its handler per principal (built on first use) and its refusals."""

    def __init__(
        self, guard: RpcGuard, method: str, handler: grpc.RpcMethodHandler, admit: Admit | None
    ) -> None:
        if handler.unary_unary is None and handler.unary_stream is None:
            raise TypeError(f"{method}: client-streaming handlers are not guarded (none here)")
        self.guard = guard
        self.method = method
        self.rpc = _rpc_name(method)
        self.handler = handler
        self.admit = admit
        self.deserializer = _tolerant(handler.request_deserializer)
        self._by_principal: dict[str, grpc.RpcMethodHandler] = {}
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}

    def for_principal(self, principal: str) -> grpc.RpcMethodHandler:
        h = self._by_principal.get(principal)
        if h is None:
            h = self._by_principal[principal] = self._build(principal)
        return h

    def refusal(self, kind: str) -> grpc.RpcMethodHandler:
        """A handler that refuses the call (`kind`: "key" or "admin"): its deserializer is the
        identity (the body is never parsed) and it counts the refusal under the method."""
        h = self._refusals.get(kind)
        if h is not None:
            return h
        failure = _denial(kind)
        m = self.guard.metrics
        counted = m.requests.labels(self.rpc, failure.code.name)
        latency = m.request_latency.labels(self.rpc)

        async def refuse(_body: bytes, context: grpc.aio.ServicerContext) -> None:
            counted.inc()
            latency.observe(0.0)  # every finished call has a duration; a refusal runs no handler
            await context.abort(failure.code, failure.message)

        if self.handler.unary_unary is not None:
            h = grpc.unary_unary_rpc_method_handler(
                refuse, response_serializer=self.handler.response_serializer
            )
        else:  # a coroutine, not a generator: grpc runs it as a stream handler that writes none
            h = grpc.unary_stream_rpc_method_handler(
                refuse, response_serializer=self.handler.response_serializer
            )
        self._refusals[kind] = h
        return h

    def _build(self, principal: str) -> grpc.RpcMethodHandler:
        g, rpc = self.guard, self.rpc
        m = g.metrics
        # Labelled children looked up once (each .labels() call takes a lock and a dict lookup).
        in_flight, latency = m.in_flight.labels(rpc), m.request_latency.labels(rpc)
        ok = m.requests.labels(rpc, grpc.StatusCode.OK.name)
        finish, admit, caller = g.finisher(rpc), self.admit, g.caller(principal)
        undecodable = g.undecodable

        if self.handler.unary_unary is not None:
            inner = self.handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                t0 = time.monotonic()
                in_flight.inc()
                bind(caller)
                try:
                    if request.__class__ is _Undecodable:
                        raise undecodable(rpc, request)
                    if admit is not None:
                        await admit(principal)
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
                request_deserializer=self.deserializer,
                response_serializer=self.handler.response_serializer,
            )

        inner_stream = self.handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            t0 = time.monotonic()
            in_flight.inc()
            bind(caller)
            try:
                if request.__class__ is _Undecodable:
                    raise undecodable(rpc, request)
                if admit is not None:
                    await admit(principal)
                async for resp in inner_stream(request, context):
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
            request_deserializer=self.deserializer,
            response_serializer=self.handler.response_serializer,
        )


class _Collector:
    """Stands in for the server while a generated `add_*Servicer_to_server` registers a
    service, to collect its handlers. Generated code registers a service twice, as a generic
    handler and as registered methods (grpcio >= 1.62); both name the same handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        for g in generic_handlers:
            service = g.service_name()
            handlers = getattr(g, "_method_handlers", None)
            if not isinstance(handlers, dict):
                raise TypeError(f"cannot guard the generic handler of {service}")
            named = {k.rsplit("/", 1)[-1]: v for k, v in handlers.items()}
            self.services.setdefault(service, {}).update(named)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.services.setdefault(service, {}).update(handlers)
