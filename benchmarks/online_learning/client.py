"""The gRPC side of a run: one channel, the stubs, the benchmark's keys, and every RPC that did
not end OK."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.online_learning.config import OnlineLearningConfig

USER_KEY, ADMIN_KEY = "bench-key", "bench-admin"


@dataclass
class Failures:
    """Every RPC that did not end OK, by phase, with the first few messages."""

    by_phase: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, phase: str, err: BaseException) -> None:
        self.by_phase[phase] += 1
        if len(self.examples) < 20:
            code = getattr(err, "code", None)
            detail = getattr(err, "details", None)
            what = f"{code()} {detail()}" if callable(code) and callable(detail) else repr(err)
            self.examples.append(f"{phase}: {what}"[:300])

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())


class Session:
    """One channel, the stubs, the failure count; grpc is imported here, not with the
    benchmark's pure parts."""

    def __init__(self, address: str, cfg: OnlineLearningConfig) -> None:
        import grpc

        from instructloop.v1 import (
            completion_pb2,
            completion_pb2_grpc,
            feedback_pb2,
            feedback_pb2_grpc,
            model_pb2,
            model_pb2_grpc,
        )

        self.cfg = cfg
        self.c, self.f, self.m = completion_pb2, feedback_pb2, model_pb2
        self.channel = grpc.aio.insecure_channel(address)
        self.completion = completion_pb2_grpc.CompletionServiceStub(self.channel)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.model = model_pb2_grpc.ModelServiceStub(self.channel)
        self.user_md = (("authorization", f"Bearer {USER_KEY}"),)
        self.admin_md = (("authorization", f"Bearer {ADMIN_KEY}"),)
        self.failures = Failures()

    async def close(self) -> None:
        await self.channel.close()

    def request(self, text: str, **kw: Any) -> Any:
        return self.c.CompletionRequest(
            messages=[self.c.ChatMessage(role="user", content=text)], **kw
        )

    async def complete(self, req: Any, phase: str, tries: int = 3) -> Any:
        """Complete, counting each failure; tried again so the phase still gets its answer."""
        for attempt in range(tries):
            try:
                return await self.completion.Complete(
                    req, metadata=self.user_md, timeout=self.cfg.request_timeout_s
                )
            except Exception as e:  # every non-OK status counts
                self.failures.add(phase, e)
                if attempt + 1 == tries:
                    raise
                await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    async def serving_version(self) -> str:
        sm = await self.model.GetServingModel(
            self.m.GetServingModelRequest(), metadata=self.admin_md, timeout=30
        )
        return str(sm.model.version)

    async def wait_serving(self, version: str | None, not_version: str, timeout: float) -> float:
        """time.time() when this replica serves `version` (or, unnamed, anything but
        `not_version`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                v = await self.serving_version()
            except Exception as e:
                self.failures.add("model_service", e)
                v = ""
            if v and (v == version if version else v != not_version):
                return time.time()
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{version or 'a new version'} not served after {timeout:.0f} s")
