"""Completions: one transport-neutral core (`Completions`) and its gRPC transport
(`CompletionService`); the OpenAI-compatible HTTP routes (serving/openai/) are the other
transport over the same core.

The core: a request is checked and tokenized (`convert.prepare`), run on the engine, and logged
with `FeedbackStore.log_completion` BEFORE it is answered (a unary response) or its final
chunk is sent (a stream); if the write fails the request fails with UNAVAILABLE. Every
response and every chunk names the model version of the engine that produced its tokens: the
version the request was admitted on (serving/engine.py). A hot swap that restarts a request on
the new version resets its candidates; a stream is told with `restarted`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from instructloop.feedback.errors import FeedbackError
from instructloop.feedback.records import new_id
from instructloop.feedback.store import FeedbackStore
from instructloop.serving.config import ServerConfig
from instructloop.serving.convert import (
    Candidate,
    Prepared,
    completion_record,
    prepare,
    timestamp,
    usage,
)
from instructloop.serving.engine import Engine
from instructloop.serving.engine_types import (
    Admitted,
    ChoiceDelta,
    EngineRequestError,
    EngineUnavailable,
)
from instructloop.serving.errors import engine_failure, logging_failure
from instructloop.serving.metrics import ServerMetrics
from instructloop.serving.quotas import charge_generated, current_principal
from instructloop.v1 import completion_pb2, completion_pb2_grpc

SERVICE_NAME = completion_pb2.DESCRIPTOR.services_by_name["CompletionService"].full_name


@dataclass
class _Step:
    """One step of a completion: its version so far, and this step's deltas (none on an
    admission). `restarted`: the candidates were reset for a new attempt on `version`."""

    version: str
    deltas: list[ChoiceDelta]
    admitted: bool = False
    restarted: bool = False


@dataclass
class Run:
    """A completion under way: the prepared request, its ids and clocks, its candidates."""

    p: Prepared
    completion_id: str
    arrived: float
    created: float
    cands: list[Candidate]


# --- what a stream yields (Completions.stream) --------------------------------------------------


@dataclass
class StreamAdmitted:
    """The engine took the request on `version`. `restarted`: a hot swap aborted the earlier
    attempt; the client drops what it received, the new attempt follows from scratch."""

    version: str
    restarted: bool


@dataclass
class StreamText:
    """New text of some candidates (never a candidate's last piece: that waits for the end)."""

    version: str
    texts: list[tuple[Candidate, str]]


@dataclass
class StreamEnd:
    """The completion is logged: each candidate's last text (`held`, by index), its finish
    reason and token count are in `run.cands`."""

    version: str
    held: dict[int, str]


StreamEvent = StreamAdmitted | StreamText | StreamEnd


class Completions:
    """The one code path of a completion, whichever transport carries it: prepare, generate on
    the engine, log before answering, name the version, restart on a hot swap."""

    def __init__(
        self,
        engine: Engine,
        store: FeedbackStore,
        config: ServerConfig,
        metrics: ServerMetrics,
    ) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        self.metrics = metrics

    async def start(self, request: completion_pb2.CompletionRequest) -> Run:
        """Check and tokenize the request (RpcFailure INVALID_ARGUMENT if it is refused)."""
        arrived, created = time.monotonic(), time.time()
        p = await prepare(request, self.engine, self.config, self.store)
        cands = [Candidate(i, new_id("resp")) for i in range(p.params.n)]
        return Run(p, new_id("cmpl"), arrived, created, cands)

    async def complete(self, run: Run) -> str:
        """Generate every candidate into `run.cands` and log the completion; return the
        version that produced it."""
        version = ""
        async with aclosing(self._generate(run)) as steps:
            async for step in steps:
                version = step.version
        await self._log(run, version)
        return version

    async def stream(self, run: Run) -> AsyncGenerator[StreamEvent, None]:
        """The completion as it grows. The first event is always a StreamAdmitted; the last is
        the StreamEnd, yielded only after the completion is logged."""
        # A candidate's last delta (the one with its finish_reason) waits for the end, which
        # comes only after the completion is logged.
        held: dict[int, str] = {}
        version = ""
        cands = run.cands
        # Closed here, not when collected: a consumer that stops (a client gone) aborts the
        # engine request before its own close returns.
        async with aclosing(self._generate(run)) as steps:
            async for step in steps:
                version = step.version
                if step.admitted:
                    if step.restarted:
                        held.clear()
                    yield StreamAdmitted(version, step.restarted)
                    continue
                texts = []
                for d in step.deltas:
                    if d.finish_reason is not None:
                        held[d.index] = d.text
                    elif d.text:
                        texts.append((cands[d.index], d.text))
                if texts:
                    yield StreamText(version, texts)
        await self._log(run, version)
        yield StreamEnd(version, held)

    async def _generate(self, s: Run) -> AsyncGenerator[_Step, None]:
        """Run the request on the engine, filling `s.cands`; yield each step."""
        m = self.metrics
        first = True
        version = ""
        m.prompt_tokens.inc(len(s.p.prompt_token_ids))
        try:
            async for ev in self.engine.generate(s.completion_id, s.p.prompt_token_ids, s.p.params):
                if isinstance(ev, Admitted):
                    version = ev.version
                    if ev.restart:
                        for c in s.cands:
                            c.reset()
                        m.swap_restarted_requests.inc()
                    yield _Step(version, [], admitted=True, restarted=ev.restart)
                    continue
                now = time.monotonic()
                for d in ev:
                    c = s.cands[d.index]
                    if d.token_ids:
                        if first:
                            m.ttft.observe(now - s.arrived)
                            first = False
                        if c.last_at is not None:
                            m.itl.observe((now - c.last_at) / len(d.token_ids))
                        c.last_at = now
                        m.generation_tokens.inc(len(d.token_ids))
                    c.text.append(d.text)
                    c.token_ids.extend(d.token_ids)
                    if d.finish_reason is not None:
                        c.finish_reason = d.finish_reason
                yield _Step(version, ev)
        except (EngineUnavailable, EngineRequestError) as e:
            raise engine_failure(e) from None
        finally:  # the principal's token quota (serving/quotas.py), whatever ended the request
            charge_generated(sum(len(c.token_ids) for c in s.cands))

    async def _log(self, s: Run, version: str) -> None:
        if not s.p.log:
            return
        rec = completion_record(
            s.p, s.completion_id, version, s.created, s.cands, principal=current_principal()
        )
        try:
            await self.store.log_completion(rec)
        except FeedbackError as e:
            self.metrics.redis_write_errors.labels("log_completion").inc()
            raise logging_failure(e) from None
        self.metrics.completions_logged.inc()


class CompletionService(completion_pb2_grpc.CompletionServiceServicer):
    """The gRPC transport of `Completions`."""

    def __init__(self, core: Completions) -> None:
        self.core = core

    async def Complete(
        self, request: completion_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> completion_pb2.CompletionResponse:
        s = await self.core.start(request)
        version = await self.core.complete(s)
        choices = [
            completion_pb2.Choice(
                index=c.index,
                response_id=c.response_id,
                text="".join(c.text),
                finish_reason=c.finish_reason or "abort",
                completion_tokens=len(c.token_ids),
            )
            for c in s.cands
        ]
        return completion_pb2.CompletionResponse(
            completion_id=s.completion_id,
            model_version=version,
            choices=choices,
            usage=usage(s.p, s.cands),
            created=timestamp(s.created),
            logged=s.p.log,
        )

    async def StreamComplete(
        self, request: completion_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[completion_pb2.CompletionChunk]:
        s = await self.core.start(request)
        cid = s.completion_id
        async for ev in self.core.stream(s):
            if isinstance(ev, StreamText):
                yield completion_pb2.CompletionChunk(
                    completion_id=cid,
                    model_version=ev.version,
                    choices=[
                        completion_pb2.ChoiceDelta(
                            index=c.index, response_id=c.response_id, text=text
                        )
                        for c, text in ev.texts
                    ],
                )
            elif isinstance(ev, StreamAdmitted):
                if ev.restarted:  # the client drops what it has; the new attempt follows
                    yield completion_pb2.CompletionChunk(
                        completion_id=cid, model_version=ev.version, restarted=True
                    )
            else:
                yield self._final_chunk(s, ev)

    @staticmethod
    def _final_chunk(s: Run, end: StreamEnd) -> completion_pb2.CompletionChunk:
        """Every candidate's last text, finish reason and token count, and the usage."""
        return completion_pb2.CompletionChunk(
            completion_id=s.completion_id,
            model_version=end.version,
            choices=[
                completion_pb2.ChoiceDelta(
                    index=c.index,
                    response_id=c.response_id,
                    text=end.held.get(c.index, ""),
                    finish_reason=c.finish_reason or "abort",
                    completion_tokens=len(c.token_ids),
                )
                for c in s.cands
            ],
            usage=usage(s.p, s.cands),
            logged=s.p.log,
        )
