"""CompletionService: runs a request on the engine and answers with every candidate, whole
(Complete) or as it grows (StreamComplete).

A completion is logged with `FeedbackStore.log_completion` BEFORE it is answered OK (Complete) or
its final chunk is sent (StreamComplete); if the write fails the RPC answers UNAVAILABLE. Every
response and every chunk names the model version of the engine that produced its tokens: the
version the request was admitted on (serving/engine.py). A hot swap that restarts a request on
the new version resets its candidates; a stream is told with `restarted`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
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
from instructloop.v1 import completion_pb2, completion_pb2_grpc

SERVICE_NAME = completion_pb2.DESCRIPTOR.services_by_name["CompletionService"].full_name


@dataclass
class _Step:
    """One step of a completion: its version so far, and this step's deltas (none on
    admission). `restarted`: the candidates were reset for a new attempt on `version`."""

    version: str
    deltas: list[ChoiceDelta]
    restarted: bool = False


@dataclass
class _Started:
    """A completion under way: the prepared request, its ids and clocks, its candidates."""

    p: Prepared
    completion_id: str
    arrived: float
    created: float
    cands: list[Candidate]


class CompletionService(completion_pb2_grpc.CompletionServiceServicer):
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

    async def _start(self, request: completion_pb2.CompletionRequest) -> _Started:
        arrived, created = time.monotonic(), time.time()
        p = await prepare(request, self.engine, self.config, self.store)
        cands = [Candidate(i, new_id("resp")) for i in range(p.params.n)]
        return _Started(p, new_id("cmpl"), arrived, created, cands)

    async def _generate(self, s: _Started) -> AsyncIterator[_Step]:
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
                    yield _Step(version, [], restarted=ev.restart)
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

    async def _log(self, s: _Started, version: str) -> None:
        if not s.p.log:
            return
        rec = completion_record(s.p, s.completion_id, version, s.created, s.cands)
        try:
            await self.store.log_completion(rec)
        except FeedbackError as e:
            self.metrics.redis_write_errors.labels("log_completion").inc()
            raise logging_failure(e) from None
        self.metrics.completions_logged.inc()

    async def Complete(
        self, request: completion_pb2.CompletionRequest, context: grpc.aio.ServicerContext
    ) -> completion_pb2.CompletionResponse:
        s = await self._start(request)
        version = ""
        async for step in self._generate(s):
            version = step.version
        await self._log(s, version)
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
        s = await self._start(request)
        cid, cands = s.completion_id, s.cands
        version = ""
        # A candidate's last delta (the one with its finish_reason) waits for the final chunk,
        # which is sent only after the completion is logged.
        held: dict[int, str] = {}
        async for step in self._generate(s):
            version = step.version
            if step.restarted:  # the client drops what it has; the new attempt follows
                held.clear()
                yield completion_pb2.CompletionChunk(
                    completion_id=cid, model_version=version, restarted=True
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
                    completion_id=cid, model_version=version, choices=out
                )
        await self._log(s, version)
        yield self._final_chunk(s, version, held)

    @staticmethod
    def _final_chunk(
        s: _Started, version: str, held: dict[int, str]
    ) -> completion_pb2.CompletionChunk:
        """Every candidate's last text, finish reason and token count, and the usage."""
        return completion_pb2.CompletionChunk(
            completion_id=s.completion_id,
            model_version=version,
            choices=[
                completion_pb2.ChoiceDelta(
                    index=c.index,
                    response_id=c.response_id,
                    text=held.get(c.index, ""),
                    finish_reason=c.finish_reason or "abort",
                    completion_tokens=len(c.token_ids),
                )
                for c in s.cands
            ],
            usage=usage(s.p, s.cands),
            logged=s.p.log,
        )
