"""The gRPC server (grpc.aio): a thin protocol layer over `serving.engine.Engine` and
`feedback.store.FeedbackStore`.

What this layer does, and nothing more:
- validates requests (precise status and message; a rejected request stores nothing);
- renders/tokenizes prompts through the engine and checks them against the context;
- turns engine deltas into gRPC responses and stream chunks;
- logs every completion with `FeedbackStore.log_completion` BEFORE answering OK (Complete) or
  sending the final chunk (StreamComplete); if the write fails the RPC answers UNAVAILABLE;
- delegates feedback to the store (which validates it, rate-limits it and keeps it idempotent);
- authenticates (`authorization: Bearer <key>`), counts metrics, serves health and reflection.

Every response and every chunk names the model version of the engine that produced its tokens:
the version a request was admitted on (serving/engine.py). A hot swap (serving/hot_swap.py) that
restarts a request on the new version resets its candidates; a stream is told with `restarted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import FeedbackError
from instructloop.feedback.records import CompletionRecord, ResponseRecord, new_id
from instructloop.feedback.store import Ack, FeedbackStore
from instructloop.serving.config import ConfigError, ServerConfig
from instructloop.serving.engine import (
    Admitted,
    ChoiceDelta,
    Engine,
    EngineRequestError,
    EngineUnavailable,
    GenerationParams,
)
from instructloop.serving.hot_swap import HotSwapper
from instructloop.serving.metrics import ServerMetrics

from instructloop.registry import AsyncModelRegistry, ModelVersion, RegistryError
from instructloop.v1 import (
    completion_pb2,
    completion_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

log = logging.getLogger("instructloop.serving")
_STOP_STEP_S = 5.0
"""How long stop() waits for each background task set and Redis client to finish."""
REPLICA_REPORT_S = 5.0
"""How often a replica reports what it serves (instructloop/registry.py: report_replica)."""

ROLES = ("system", "user", "assistant")
MAX_SEED = 2**63 - 1
COMPLETION_SERVICE = completion_pb2.DESCRIPTOR.services_by_name["CompletionService"].full_name
FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
MODEL_SERVICE = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


class RpcFailure(Exception):
    """Ends an RPC with `code` and `message` (RpcGuard turns it into the status)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


def _store_failure(e: FeedbackError | RegistryError) -> RpcFailure:
    code = getattr(grpc.StatusCode, e.grpc_code_name, grpc.StatusCode.INTERNAL)
    return RpcFailure(code, str(e))


def _timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


# --------------------------------------------------------------------------------------------
# Completion requests: validation and preparation
# --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A validated completion request, ready for the engine."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    prompt_text: str
    prompt_token_ids: list[int]
    params: GenerationParams
    user_id: str
    metadata: dict[str, str]
    log: bool

    def sampling_dict(self) -> dict[str, Any]:
        p = self.params
        return {
            "n": p.n,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
            "stop": list(p.stop),
        }


def check_request(
    req: completion_pb2.CompletionRequest, cfg: ServerConfig, store_cfg: StoreConfig
) -> None:
    """Everything that needs no tokenizer. Raises RpcFailure(INVALID_ARGUMENT)."""
    if req.prompt and len(req.messages):
        raise invalid("set exactly one of prompt and messages, not both")
    if not req.prompt and not len(req.messages):
        raise invalid("the prompt is empty: set prompt (raw text) or messages (a chat)")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            roles = ", ".join(ROLES)
            raise invalid(f"messages[{i}].role {m.role!r} is unknown; use one of {roles}")
    if len(req.messages) and not any(m.content for m in req.messages):
        raise invalid("every message is empty")
    if req.n > cfg.max_n:
        raise invalid(f"n must be 1 to {cfg.max_n} (0 means 1), got {req.n}")
    if req.HasField("max_tokens") and req.max_tokens < 1:
        raise invalid("max_tokens must be at least 1 (leave it unset for the server's default)")
    if req.HasField("temperature"):
        t = req.temperature
        if not math.isfinite(t) or not 0.0 <= t <= cfg.max_temperature:
            raise invalid(f"temperature must be 0 to {cfg.max_temperature:g}, got {t:g}")
        if t == 0.0 and req.n > 1:
            raise invalid(
                "n > 1 needs temperature > 0: greedy decoding gives the same candidate n times"
            )
    if req.HasField("top_p"):
        p = req.top_p
        if not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise invalid(f"top_p must be in (0, 1], got {p:g}")
    if req.HasField("seed") and not 0 <= req.seed <= MAX_SEED:
        raise invalid(f"seed must be 0 to {MAX_SEED}, got {req.seed}")
    if len(req.stop) > cfg.max_stop:
        raise invalid(f"at most {cfg.max_stop} stop strings, got {len(req.stop)}")
    for i, s in enumerate(req.stop):
        if not s:
            raise invalid(f"stop[{i}] is empty")
        if len(s) > cfg.max_stop_chars:
            raise invalid(f"stop[{i}] is {len(s)} characters; at most {cfg.max_stop_chars}")
    if len(req.user_id) > store_cfg.max_id_chars:
        raise invalid(f"user_id is {len(req.user_id)} characters; at most {store_cfg.max_id_chars}")


async def prepare(
    req: completion_pb2.CompletionRequest,
    engine: Engine,
    cfg: ServerConfig,
    store: FeedbackStore,
) -> Prepared:
    check_request(req, cfg, store.config)
    metadata = dict(req.metadata)
    try:
        store.check_metadata(metadata)
    except FeedbackError as e:
        raise invalid(str(e)) from None

    messages: list[dict[str, str]] | None = None
    if len(req.messages):
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            prompt_text = engine.render_messages(messages)
        except EngineUnavailable:
            raise
        except Exception as e:  # the template's own checks (e.g. role order) speak here
            raise invalid(f"the model's chat template rejected the messages: {e}") from None
        add_special = False  # the template wrote the special tokens
    else:
        prompt_text = req.prompt
        add_special = True
    if len(prompt_text) > 64_000:  # keep long tokenizations off the event loop
        ids = await asyncio.to_thread(engine.encode, prompt_text, add_special_tokens=add_special)
    else:
        ids = engine.encode(prompt_text, add_special_tokens=add_special)
    if not ids:
        raise invalid("the prompt has no tokens")

    ctx = engine.max_model_len
    room = ctx - len(ids)
    if room < 1:
        raise invalid(
            f"the prompt has {len(ids)} tokens; the model's context holds {ctx} tokens, "
            "prompt and output together"
        )
    if req.HasField("max_tokens"):
        if req.max_tokens > room:
            raise invalid(
                f"max_tokens {req.max_tokens} plus the prompt's {len(ids)} tokens exceeds the "
                f"model's context of {ctx} tokens (at most {room} for this prompt)"
            )
        max_tokens = int(req.max_tokens)
    else:
        max_tokens = min(cfg.default_max_tokens, room)
    params = GenerationParams(
        n=max(1, int(req.n)),
        max_tokens=max_tokens,
        temperature=float(req.temperature) if req.HasField("temperature") else 1.0,
        top_p=float(req.top_p) if req.HasField("top_p") else 1.0,
        seed=int(req.seed) if req.HasField("seed") else None,
        stop=tuple(req.stop),
    )
    return Prepared(
        prompt=None if messages is not None else req.prompt,
        messages=messages,
        prompt_text=prompt_text,
        prompt_token_ids=ids,
        params=params,
        user_id=req.user_id,
        metadata=metadata,
        log=not req.disable_logging,
    )


@dataclass
class _Candidate:
    index: int
    response_id: str
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    last_at: float | None = None

    def reset(self) -> None:
        """Forget a swap-aborted attempt's output; the response id stays."""
        self.text.clear()
        self.token_ids.clear()
        self.finish_reason = None
        self.last_at = None


@dataclass
class _Step:
    """One step of a completion: its version so far, and this step's deltas (none on
    admission). `restarted`: the candidates were reset for a new attempt on `version`."""

    version: str
    deltas: list[ChoiceDelta]
    restarted: bool = False


# --------------------------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------------------------


class _Base:
    def __init__(self, app: InstructloopServer) -> None:
        self.app = app


class CompletionService(_Base, completion_pb2_grpc.CompletionServiceServicer):
    async def _generate(
        self, p: Prepared, completion_id: str, arrived: float, cands: list[_Candidate]
    ) -> AsyncIterator[_Step]:
        """Run the request on the engine, filling `cands`; yield each step."""
        app = self.app
        first = True
        version = ""
        app.metrics.prompt_tokens.inc(len(p.prompt_token_ids))
        try:
            async for ev in app.engine.generate(completion_id, p.prompt_token_ids, p.params):
                if isinstance(ev, Admitted):
                    version = ev.version
                    if ev.restart:
                        for c in cands:
                            c.reset()
                        app.metrics.swap_restarted_requests.inc()
                    yield _Step(version, [], restarted=ev.restart)
                    continue
                deltas = ev
                now = time.monotonic()
                for d in deltas:
                    c = cands[d.index]
                    if d.token_ids:
                        if first:
                            app.metrics.ttft.observe(now - arrived)
                            first = False
                        if c.last_at is not None:
                            app.metrics.itl.observe((now - c.last_at) / len(d.token_ids))
                        c.last_at = now
                        app.metrics.generation_tokens.inc(len(d.token_ids))
                    c.text.append(d.text)
                    c.token_ids.extend(d.token_ids)
                    if d.finish_reason is not None:
                        c.finish_reason = d.finish_reason
                yield _Step(version, deltas)
        except EngineUnavailable as e:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except EngineRequestError as e:
            raise invalid(f"the engine rejected the request: {e}") from None

    async def _log(
        self, p: Prepared, completion_id: str, version: str, created: float, cands: list[_Candidate]
    ) -> None:
        if not p.log:
            return
        rec = CompletionRecord(
            completion_id=completion_id,
            model_version=version,
            user_id=p.user_id,
            prompt=p.prompt,
            messages=p.messages,
            prompt_text=p.prompt_text,
            prompt_token_ids=p.prompt_token_ids,
            sampling=p.sampling_dict(),
            metadata=p.metadata,
            created_at=created,
            finished_at=time.time(),
            responses=[
                ResponseRecord(
                    response_id=c.response_id,
                    index=c.index,
                    text="".join(c.text),
                    token_ids=c.token_ids,
                    finish_reason=c.finish_reason or "abort",
                    completion_tokens=len(c.token_ids),
                )
                for c in cands
            ],
        )
        try:
            await self.app.store.log_completion(rec)
        except FeedbackError as e:
            self.app.metrics.redis_write_errors.labels("log_completion").inc()
            if e.grpc_code_name == "UNAVAILABLE":
                raise RpcFailure(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the completion could not be logged ({e}); it was not returned, retry",
                ) from None
            raise RpcFailure(
                grpc.StatusCode.INTERNAL, f"logging the completion failed: {e}"
            ) from None
        self.app.metrics.completions_logged.inc()

    async def Complete(
        self, request: completion_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> completion_pb2.CompletionResponse:
        arrived, created = time.monotonic(), time.time()
        app = self.app
        p = await prepare(request, app.engine, app.config, app.store)
        completion_id = new_id("cmpl")
        cands = [_Candidate(i, new_id("resp")) for i in range(p.params.n)]
        version = ""
        async for step in self._generate(p, completion_id, arrived, cands):
            version = step.version
        await self._log(p, completion_id, version, created, cands)
        choices = [
            completion_pb2.Choice(
                index=c.index,
                response_id=c.response_id,
                text="".join(c.text),
                finish_reason=c.finish_reason or "abort",
                completion_tokens=len(c.token_ids),
            )
            for c in cands
        ]
        return completion_pb2.CompletionResponse(
            completion_id=completion_id,
            model_version=version,
            choices=choices,
            usage=completion_pb2.Usage(
                prompt_tokens=len(p.prompt_token_ids),
                completion_tokens=sum(len(c.token_ids) for c in cands),
            ),
            created=_timestamp(created),
            logged=p.log,
        )

    async def StreamComplete(
        self, request: completion_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[completion_pb2.CompletionChunk]:
        arrived, created = time.monotonic(), time.time()
        app = self.app
        p = await prepare(request, app.engine, app.config, app.store)
        completion_id = new_id("cmpl")
        cands = [_Candidate(i, new_id("resp")) for i in range(p.params.n)]
        version = ""
        # A candidate's last delta (the one with its finish_reason) waits for the final chunk,
        # which is sent only after the completion is logged.
        held: dict[int, str] = {}
        async for step in self._generate(p, completion_id, arrived, cands):
            version = step.version
            if step.restarted:  # the client drops what it has; the new attempt follows
                held.clear()
                yield completion_pb2.CompletionChunk(
                    completion_id=completion_id, model_version=version, restarted=True
                )
            out = []
            for d in step.deltas:
                if d.finish_reason is not None:
                    held[d.index] = d.text
                elif d.text:
                    out.append(
                        completion_pb2.ChoiceDelta(
                            index=d.index, response_id=cands[d.index].response_id, text=d.text
                        )
                    )
            if out:
                yield completion_pb2.CompletionChunk(
                    completion_id=completion_id, model_version=version, choices=out
                )
        await self._log(p, completion_id, version, created, cands)
        yield completion_pb2.CompletionChunk(
            completion_id=completion_id,
            model_version=version,
            choices=[
                completion_pb2.ChoiceDelta(
                    index=c.index,
                    response_id=c.response_id,
                    text=held.get(c.index, ""),
                    finish_reason=c.finish_reason or "abort",
                    completion_tokens=len(c.token_ids),
                )
                for c in cands
            ],
            usage=completion_pb2.Usage(
                prompt_tokens=len(p.prompt_token_ids),
                completion_tokens=sum(len(c.token_ids) for c in cands),
            ),
            logged=p.log,
        )


_SCALES = {
    feedback_pb2.RATING_SCALE_THUMB: "thumb",
    feedback_pb2.RATING_SCALE_LIKERT_7: "likert7",
}


class FeedbackService(_Base, feedback_pb2_grpc.FeedbackServiceServicer):
    async def _submit(self, kind: str, call: Awaitable[Ack]) -> feedback_pb2.FeedbackAck:
        try:
            ack = await call
        except FeedbackError as e:
            if e.grpc_code_name == "UNAVAILABLE":
                self.app.metrics.redis_write_errors.labels(f"submit_{kind}").inc()
            raise _store_failure(e) from None
        if not ack.duplicate:
            self.app.metrics.feedback_records.labels(kind).inc()
        return feedback_pb2.FeedbackAck(
            feedback_id=ack.feedback_id, duplicate=ack.duplicate, created=_timestamp(ack.created_at)
        )

    async def SubmitComparison(
        self, request: feedback_pb2.SubmitComparisonRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.FeedbackAck:
        return await self._submit(
            "comparison",
            self.app.store.submit_comparison(
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
            self.app.store.submit_ranking(
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
        scale = _SCALES.get(request.scale)
        if scale is None:
            raise invalid("scale is required: RATING_SCALE_THUMB or RATING_SCALE_LIKERT_7")
        return await self._submit(
            "rating",
            self.app.store.submit_rating(
                user_id=request.user_id,
                idempotency_key=request.idempotency_key or None,
                response_id=request.response_id,
                scale=scale,
                score=int(request.score),
            ),
        )


def _model_pb(mv: ModelVersion) -> model_pb2.ModelVersion:
    return model_pb2.ModelVersion(
        version=mv.version,
        path=mv.path,
        parent=mv.parent or "",
        source=mv.source,
        created=_timestamp(mv.created_at),
        data_snapshot=mv.data_snapshot or "",
        metrics=mv.metrics,
        gate=mv.gate or "",
    )


class ModelService(_Base, model_pb2_grpc.ModelServiceServicer):
    async def _live_version(self) -> str:
        try:
            live = await self.app.registry.live()
        except RegistryError as e:
            raise _store_failure(e) from None
        return live.version if live else ""

    async def _serving(self, live_version: str | None = None) -> model_pb2.ServingModel:
        app = self.app
        mv = app.model
        with contextlib.suppress(RegistryError):
            mv = await app.registry.get(app.engine.model_version)  # fresh metrics and gate
        return model_pb2.ServingModel(
            model=_model_pb(mv),
            serving_since=_timestamp(max(app.serving_since, app.engine.serving_since)),
            live_version=live_version if live_version is not None else await self._live_version(),
            replica_id=app.config.replica_id,
        )

    async def GetServingModel(
        self, request: model_pb2.GetServingModelRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ServingModel:
        return await self._serving()

    async def ListModels(
        self, request: model_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ListModelsResponse:
        try:
            models = await self.app.registry.list()
        except RegistryError as e:
            raise _store_failure(e) from None
        return model_pb2.ListModelsResponse(
            models=[_model_pb(m) for m in models], live_version=await self._live_version()
        )

    async def PromoteModel(
        self, request: model_pb2.PromoteModelRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ServingModel:
        """One atomic registry update that announces itself; every following replica swaps."""
        if not request.version:
            raise invalid("version is required (e.g. 'v3'; ListModels shows them)")
        try:
            mv = await self.app.registry.promote(request.version, force=request.force)
        except RegistryError as e:
            raise _store_failure(e) from None
        log.info("promoted %s (force=%s) through ModelService", mv.version, request.force)
        return await self._serving(live_version=mv.version)

    async def RollbackModel(
        self, request: model_pb2.RollbackModelRequest, context: grpc.aio.ServicerContext
    ) -> model_pb2.ServingModel:
        try:
            mv = await self.app.registry.rollback()
        except RegistryError as e:
            raise _store_failure(e) from None
        log.info("rolled back to %s through ModelService", mv.version)
        return await self._serving(live_version=mv.version)


# --------------------------------------------------------------------------------------------
# Auth + metrics interceptor
# --------------------------------------------------------------------------------------------


class Authenticator:
    """Bearer keys: user keys call completions and feedback, admin keys call everything."""

    def __init__(self, users: frozenset[str], admins: frozenset[str]) -> None:
        self.users = [k.encode() for k in users]
        self.admins = [k.encode() for k in admins]

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.admins)

    def role(self, header: str | None) -> str | None:
        """ "admin", "user" or None (missing or wrong key). Constant-time per key."""
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        k = key.strip().encode()
        is_admin = any([hmac.compare_digest(k, a) for a in self.admins])
        is_user = any([hmac.compare_digest(k, u) for u in self.users])
        return "admin" if is_admin else "user" if is_user else None


def _denial(kind: str) -> RpcFailure:
    if kind == "admin":
        return RpcFailure(grpc.StatusCode.PERMISSION_DENIED, "ModelService needs an admin key")
    return RpcFailure(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid API key: send metadata `authorization: Bearer <key>`",
    )


def _rpc_name(method: str) -> str:
    return method.rsplit("/", 1)[-1] or method


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

    def _refusal(self, method: str, context: grpc.aio.ServicerContext) -> str | None:
        """ "key" (missing or wrong key), "admin" (a user key on ModelService) or None."""
        if not self.auth.enabled:
            return None
        raw = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                raw = value
                break
        role = self.auth.role(raw if isinstance(raw, str) else None)
        if role is None:
            return "key"
        if method.startswith(f"/{MODEL_SERVICE}/") and role != "admin":
            return "admin"
        return None

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        m = self.metrics
        rpc = _rpc_name(method)
        # Labelled children looked up once (each .labels() call takes a lock and a dict lookup).
        in_flight = m.in_flight.labels(rpc)
        latency = m.request_latency.labels(rpc)
        ok = m.requests.labels(rpc, grpc.StatusCode.OK.name)
        refusal = self._refusal

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
            m.requests.labels(rpc, code.name).inc()
            if isinstance(err, RpcFailure):
                await context.abort(err.code, err.message)
            elif not isinstance(err, asyncio.CancelledError):
                log.exception("%s failed", rpc, exc_info=err)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                t0 = time.monotonic()
                in_flight.inc()
                try:
                    deny = refusal(method, context)
                    if deny is not None:
                        raise _denial(deny)
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

        if handler.unary_stream is not None:
            inner_s = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                t0 = time.monotonic()
                in_flight.inc()
                try:
                    deny = refusal(method, context)
                    if deny is not None:
                        raise _denial(deny)
                    async for resp in inner_s(request, context):
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
        raise TypeError(f"{method}: client-streaming handlers are not guarded (none in our protos)")


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


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def resolve_model_path(model: str) -> Path:
    """A local model directory as is; a hub id downloaded (or found in the cache) first."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.is_absolute() or model.startswith((".", "~")):
        raise ConfigError(f"model directory {model} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model))
    except Exception as e:
        raise ConfigError(f"cannot find model {model!r} locally or on the hub: {e}") from e


class InstructloopServer:
    """The whole serving process: engine, store, registry, gRPC server, metrics.

    `engine`: pass an already started Engine to share it (tests run several servers on one
    engine); it is then not shut down by `stop()`.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        engine: Engine | None = None,
        progress: Callable[[str], None] = lambda _m: None,
    ) -> None:
        config.validate()
        self.config = config
        self.progress = progress
        self.metrics = ServerMetrics()
        users, admins = config.all_keys()
        self.auth = Authenticator(users, admins)
        store_cfg = StoreConfig(key_prefix=config.key_prefix)
        if config.feedback_rate_limit_per_minute is not None:
            store_cfg.rate_limit_per_minute = config.feedback_rate_limit_per_minute
        if config.completion_ttl_s is not None:
            store_cfg.completion_ttl_s = config.completion_ttl_s
        try:
            self.store = FeedbackStore.from_url(config.redis_url, store_cfg)
        except ValueError as e:  # a URL the store cannot use (e.g. rediss://)
            raise ConfigError(f"--redis-url {config.redis_url}: {e}") from e
        self.registry = AsyncModelRegistry(config.redis_url, prefix=config.key_prefix)
        self._own_engine = engine is None
        self.engine: Engine = engine  # type: ignore[assignment]  # set in start()
        self.model: ModelVersion
        self.serving_since = 0.0
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.swapper: HotSwapper | None = None
        self._stopped = False
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.config.grpc_host}:{self.port}"

    async def _resolve_model(self) -> ModelVersion:
        """Which checkpoint to serve, registered (and made live if nothing is)."""
        cfg = self.config
        if cfg.model is None:
            live = await self.registry.live()
            if live is not None:
                return live
            from instructloop.model_init import is_model_dir
            from instructloop.paths import default_model_dir

            path = default_model_dir()
            if not is_model_dir(path):
                raise ConfigError(
                    f"no model to serve: the registry has no live version and {path} does not "
                    "exist; run `instructloop model init` or pass --model"
                )
            source = "init"
        else:
            path = await asyncio.to_thread(resolve_model_path, cfg.model)
            source = "register"
        mv = await self.registry.register(path, source=source)
        if await self.registry.live() is None:
            await self.registry.promote(mv.version)
        return mv

    async def start(self) -> InstructloopServer:
        cfg = self.config
        if not self.auth.enabled:
            log.warning(
                "AUTHENTICATION IS OFF: no API keys configured (INSTRUCTLOOP_API_KEYS / "
                "INSTRUCTLOOP_ADMIN_KEYS / --api-keys-file); anyone who reaches %s:%s can call "
                "every RPC, ModelService included",
                cfg.grpc_host,
                cfg.grpc_port,
            )
        self.progress(f"registry: {cfg.redis_url} (prefix {cfg.key_prefix!r})")
        if self.engine is None:
            try:
                self.model = await self._resolve_model()
            except RegistryError as e:
                raise ConfigError(f"model registry: {e}") from e
            self.engine = Engine(self.model.path, cfg, model_version=self.model.version)
            await self.engine.start(self.progress)
        else:
            # A shared engine: it serves what it serves; make sure the registry knows it.
            if not self.engine.model_version:
                raise ConfigError("a shared engine must carry its model_version")
            try:
                self.model = await self.registry.get(self.engine.model_version)
            except RegistryError:
                self.model = await self.registry.register(self.engine.model, source="register")
                if await self.registry.live() is None:
                    await self.registry.promote(self.model.version)
        self.serving_since = time.time()
        self.metrics.set_served_model(self.model.version, self.model.path, cfg.replica_id)
        self.metrics.engine_up.set(1)

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        guard = RpcGuard(self.auth, self.metrics)
        guard.register(
            completion_pb2_grpc.add_CompletionServiceServicer_to_server,
            CompletionService(self),
            server,
        )
        guard.register(
            feedback_pb2_grpc.add_FeedbackServiceServicer_to_server, FeedbackService(self), server
        )
        guard.register(
            model_pb2_grpc.add_ModelServiceServicer_to_server, ModelService(self), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                COMPLETION_SERVICE,
                FEEDBACK_SERVICE,
                MODEL_SERVICE,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        target = f"{cfg.grpc_host}:{cfg.grpc_port}"
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
            )
            self.port = server.add_secure_port(target, creds)
        else:
            self.port = server.add_insecure_port(target)
        if not self.port:
            raise ConfigError(f"cannot listen on {target}")
        await server.start()
        self._server = server
        if cfg.metrics_port is not None:
            self.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        await self._set_serving(True)
        self._tasks.append(asyncio.create_task(self._watch_engine_stats()))
        self._tasks.append(asyncio.create_task(self._report_replica()))
        if self._own_engine:
            self._tasks.append(
                asyncio.create_task(
                    self.engine.supervise(self._on_engine_state, progress=self.progress)
                )
            )
        else:
            self._tasks.append(asyncio.create_task(self._follow_shared_engine()))
        if cfg.follows_live:
            self.swapper = HotSwapper(self)
            self._tasks.append(asyncio.create_task(self.swapper.run()))
        self.progress(
            f"serving {self.model.version} ({self.model.path}) on {self.address}"
            + (f", metrics on :{self.metrics.port}/metrics" if self.metrics.port else "")
        )
        return self

    def on_swapped(self, mv: ModelVersion) -> None:
        """The engine serves `mv` now (this replica's swap, or another server's on a shared
        engine): what GetServingModel and the metrics report follows."""
        self.model = mv
        self.serving_since = self.engine.serving_since
        self.metrics.set_served_model(mv.version, mv.path, self.config.replica_id)

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", COMPLETION_SERVICE, FEEDBACK_SERVICE, MODEL_SERVICE):
            await self.health.set(name, status)

    def _on_engine_state(self, up: bool) -> None:
        self.metrics.engine_up.set(1 if up else 0)
        if up:
            self.metrics.engine_restarts.inc()
            self.serving_since = time.time()
        asyncio.get_running_loop().create_task(self._set_serving(up))

    async def _follow_shared_engine(self) -> None:
        """Health for a server on a shared engine: mirror the engine's state."""
        up = True
        restarts = self.engine.restarts
        while True:
            await asyncio.sleep(0.5)
            now_up = self.engine.alive
            if now_up != up:
                up = now_up
                self.metrics.engine_up.set(1 if up else 0)
                await self._set_serving(up)
            if self.engine.restarts != restarts:
                self.metrics.engine_restarts.inc(self.engine.restarts - restarts)
                restarts = self.engine.restarts

    async def _report_replica(self) -> None:
        """Tell the registry what this replica serves, every REPLICA_REPORT_S, for `instructloop
        status` (a Redis error only skips a report)."""
        while True:
            info = {
                "version": self.model.version,
                "address": self.address,
                "pid": os.getpid(),
                "follows_live": self.config.follows_live,
                "serving_since": self.serving_since,
                "engine_up": self.engine.alive,
                "swap_error": self.swapper.last_error if self.swapper else None,
            }
            try:
                await self.registry.report_replica(self.config.replica_id, info)
            except Exception as e:
                log.debug("replica report failed: %s", e)
            await asyncio.sleep(REPLICA_REPORT_S)

    async def _watch_engine_stats(self) -> None:
        aborted = self.engine.stats.aborted_requests
        while True:
            s = self.engine.stats
            self.metrics.engine_running.set(s.num_running_reqs)
            self.metrics.engine_waiting.set(s.num_waiting_reqs)
            self.metrics.kv_cache_usage.set(s.kv_cache_usage)
            if s.aborted_requests > aborted:
                self.metrics.engine_aborts.inc(s.aborted_requests - aborted)
                aborted = s.aborted_requests
            await asyncio.sleep(0.5)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING, in-flight RPCs get `grace` seconds, then close all."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        # The supervisor goes first: an engine that dies while we stop (Ctrl-C in a terminal
        # reaches the engine process too) must not be restarted.
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # Bounded: a task stuck in a client library (redis-py reconnecting to a Redis that
            # went away) must not keep the server from stopping.
            _, pending = await asyncio.wait(self._tasks, timeout=_STOP_STEP_S)
            for t in pending:
                log.warning("stop: background task %s did not finish; left behind", t.get_name())
        self._tasks.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
        self.metrics.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.registry.remove_replica(self.config.replica_id), 2.0)
        if self._own_engine and self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        for close in (self.store.close, self.registry.close):
            try:
                await asyncio.wait_for(close(), _STOP_STEP_S)
            except Exception as e:  # a dead Redis: acks were written before they were sent
                log.warning("closing a Redis client on stop failed: %s", e)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
