"""The asyncio client (`AsyncClient`): `Client`'s methods, awaited, on grpc.aio.

Make it inside a coroutine (`async with AsyncClient(...) as client:`): a grpc.aio channel
belongs to the event loop it was made on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal

import grpc

from instructloop_client import _calls
from instructloop_client._calls import (
    CHANNEL_OPTIONS,
    Prompt,
    Response,
    RetryPolicy,
    Tls,
)
from instructloop_client.types import (
    Completion,
    CompletionChunk,
    FeedbackAck,
    StreamAssembler,
)
from instructloop_client.v1 import completion_pb2_grpc, feedback_pb2_grpc


class AsyncCompletionStream:
    """`CompletionStream` for asyncio: `async for chunk in stream`, then `completion()`."""

    def __init__(self, chunks: AsyncIterator[CompletionChunk]) -> None:
        self._chunks = chunks
        self._assembled = StreamAssembler()

    async def __aiter__(self) -> AsyncIterator[CompletionChunk]:
        async for chunk in self._chunks:
            self._assembled.add(chunk)
            yield chunk

    def completion(self) -> Completion:
        """The whole answer; the stream must have been iterated to its end."""
        return self._assembled.completion()

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncCompletionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """`Client` (instructloop_client.client) for asyncio; the same arguments and methods."""

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        *,
        tls: Tls = False,
        user_id: str = "",
        retry: RetryPolicy | None = None,
        timeout_s: float | None = 60.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        creds = _calls.credentials(tls)
        opts = [*CHANNEL_OPTIONS, *options]
        self.channel = (
            grpc.aio.secure_channel(address, creds, opts)
            if creds is not None
            else grpc.aio.insecure_channel(address, opts)
        )
        self._completions = completion_pb2_grpc.CompletionServiceStub(self.channel)
        self._feedback = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self._metadata = _calls.auth_metadata(api_key)
        self.user_id = user_id
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- completions --------------------------------------------------------------------------

    async def complete(
        self,
        prompt: Prompt,
        *,
        n: int = 1,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        user_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        disable_logging: bool = False,
        timeout_s: float | None = None,
    ) -> Completion:
        req = _calls.completion_request(
            prompt, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            stop=stop, user_id=self.user_id if user_id is None else user_id, metadata=metadata,
            disable_logging=disable_logging,
        )  # fmt: skip
        msg, _ = await self._unary(self._completions.Complete, req, timeout_s, idempotent=False)
        return Completion.from_proto(msg)

    def stream(
        self,
        prompt: Prompt,
        *,
        n: int = 1,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        user_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        disable_logging: bool = False,
        timeout_s: float | None = None,
    ) -> AsyncCompletionStream:
        req = _calls.completion_request(
            prompt, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            stop=stop, user_id=self.user_id if user_id is None else user_id, metadata=metadata,
            disable_logging=disable_logging,
        )  # fmt: skip
        return AsyncCompletionStream(self._stream(req, timeout_s))

    async def _stream(self, req: Any, timeout_s: float | None) -> AsyncIterator[CompletionChunk]:
        attempt = 0
        while True:
            attempt += 1
            call = self._completions.StreamComplete(
                req, metadata=self._metadata, timeout=self._timeout(timeout_s)
            )
            got_any = False
            try:
                async for msg in call:
                    got_any = True
                    yield CompletionChunk.from_proto(msg)
                return
            except grpc.RpcError as e:
                if got_any or not self.retry.should_retry(e, attempt, idempotent=False):
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(self.retry.backoff_s(attempt))

    # -- feedback -----------------------------------------------------------------------------

    async def rank(
        self,
        completion: Completion | str,
        order: Sequence[int | Response],
        *,
        ranks: Sequence[int] | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackAck:
        key = idempotency_key or _calls.new_idempotency_key()
        req = _calls.ranking_request(
            completion, order, ranks=ranks, user_id=self._user(user_id), key=key
        )
        return await self._submit(self._feedback.SubmitRanking, req, idempotency_key, timeout_s)

    async def compare(
        self,
        chosen: Response,
        rejected: Response,
        *,
        tie: bool = False,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackAck:
        key = idempotency_key or _calls.new_idempotency_key()
        req = _calls.comparison_request(
            chosen, rejected, tie=tie, user_id=self._user(user_id), key=key
        )
        return await self._submit(self._feedback.SubmitComparison, req, idempotency_key, timeout_s)

    async def rate(
        self,
        response: Response,
        score: int,
        *,
        scale: Literal["thumb", "likert7"],
        user_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackAck:
        key = idempotency_key or _calls.new_idempotency_key()
        req = _calls.rating_request(
            response, score, scale=scale, user_id=self._user(user_id), key=key
        )
        return await self._submit(self._feedback.SubmitRating, req, idempotency_key, timeout_s)

    # -- plumbing -----------------------------------------------------------------------------

    def _user(self, user_id: str | None) -> str:
        return self.user_id if user_id is None else user_id

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    async def _submit(
        self, method: Callable[..., Any], req: Any, caller_key: str | None, timeout_s: float | None
    ) -> FeedbackAck:
        msg, attempts = await self._unary(method, req, timeout_s, idempotent=True)
        return _calls.ack(msg, own_key=caller_key is None, attempts=attempts)

    async def _unary(
        self, method: Callable[..., Any], req: Any, timeout_s: float | None, *, idempotent: bool
    ) -> tuple[Any, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                msg = await method(req, metadata=self._metadata, timeout=self._timeout(timeout_s))
                return msg, attempt
            except grpc.RpcError as e:
                if not self.retry.should_retry(e, attempt, idempotent=idempotent):
                    raise
            await asyncio.sleep(self.retry.backoff_s(attempt))
