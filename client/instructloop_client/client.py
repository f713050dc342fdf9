"""The synchronous client (`Client`); `instructloop_client.aio` has the asyncio twin."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

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

T = TypeVar("T")


class CompletionStream:
    """The chunks of one streamed completion, as they are generated.

    Iterate it once; `completion()` then gives the whole answer (for `Client.rank`). A chunk
    with `restarted` means a hot swap restarted the answer on new weights: drop what you
    showed. Closing it early (`close()`, or a `with` block) cancels the call on the server."""

    def __init__(self, chunks: Iterator[CompletionChunk]) -> None:
        self._chunks = chunks
        self._assembled = StreamAssembler()

    def __iter__(self) -> Iterator[CompletionChunk]:
        for chunk in self._chunks:
            self._assembled.add(chunk)
            yield chunk

    def completion(self) -> Completion:
        """The whole answer; the stream must have been iterated to its end."""
        return self._assembled.completion()

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """instructloop's gRPC API: completions and the users' judgements of them.

    `address` is host:port. `api_key` goes out as `authorization: Bearer <key>`. `tls` (see
    `_calls.Tls`): False for plaintext (a server on this machine), True to check the server
    against the system's roots, or a CA file or PEM bytes. `user_id` is the default end-user id
    for completions and feedback (each call may name another). `retry` says which failures are
    tried again (RetryPolicy; NO_RETRY to turn it off). `timeout_s` bounds each try.

    Feedback calls carry an idempotency key: the caller's, or one the client makes for the call.
    Every retry of the call reuses it, so a judgement whose first try reached the server but
    whose answer was lost is recorded once.
    """

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
            grpc.secure_channel(address, creds, opts)
            if creds is not None
            else grpc.insecure_channel(address, opts)
        )
        self._completions = completion_pb2_grpc.CompletionServiceStub(self.channel)
        self._feedback = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self._metadata = _calls.auth_metadata(api_key)
        self.user_id = user_id
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- completions --------------------------------------------------------------------------

    def complete(
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
        """n candidate answers to `prompt` (text, or chat messages); unset sampling settings
        take the server's defaults. The answer returns once the completion is logged."""
        req = _calls.completion_request(
            prompt, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            stop=stop, user_id=self.user_id if user_id is None else user_id, metadata=metadata,
            disable_logging=disable_logging,
        )  # fmt: skip
        msg, _ = self._unary(self._completions.Complete, req, timeout_s, idempotent=False)
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
    ) -> CompletionStream:
        """`complete`, chunk by chunk (CompletionStream). The last chunk, with usage, comes
        after the completion is logged. Retried only until the first chunk arrives."""
        req = _calls.completion_request(
            prompt, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            stop=stop, user_id=self.user_id if user_id is None else user_id, metadata=metadata,
            disable_logging=disable_logging,
        )  # fmt: skip
        return CompletionStream(self._stream(req, timeout_s))

    def _stream(self, req: Any, timeout_s: float | None) -> Iterator[CompletionChunk]:
        attempt = 0
        while True:
            attempt += 1
            call = self._completions.StreamComplete(
                req, metadata=self._metadata, timeout=self._timeout(timeout_s)
            )
            got_any = False
            try:
                for msg in call:
                    got_any = True
                    yield CompletionChunk.from_proto(msg)
                return
            except grpc.RpcError as e:
                if got_any or not self.retry.should_retry(e, attempt, idempotent=False):
                    raise
            finally:
                call.cancel()  # the caller stopped early (or it ended: then a no-op)
            time.sleep(self.retry.backoff_s(attempt))

    # -- feedback -----------------------------------------------------------------------------

    def rank(
        self,
        completion: Completion | str,
        order: Sequence[int | Response],
        *,
        ranks: Sequence[int] | None = None,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackAck:
        """A K-way ranking of a completion's responses, best first (InstructGPT's rankings).
        `order` holds indexes into `completion.choices`, Choices or response ids; `ranks`
        (optional, one per entry, 1 = best, equal = tie) marks ties."""
        key = idempotency_key or _calls.new_idempotency_key()
        req = _calls.ranking_request(
            completion, order, ranks=ranks, user_id=self._user(user_id), key=key
        )
        return self._submit(self._feedback.SubmitRanking, req, idempotency_key, timeout_s)

    def compare(
        self,
        chosen: Response,
        rejected: Response,
        *,
        tie: bool = False,
        user_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackAck:
        """A pairwise judgement between two responses of one completion (`tie`: equally
        good)."""
        key = idempotency_key or _calls.new_idempotency_key()
        req = _calls.comparison_request(
            chosen, rejected, tie=tie, user_id=self._user(user_id), key=key
        )
        return self._submit(self._feedback.SubmitComparison, req, idempotency_key, timeout_s)

    def rate(
        self,
        response: Response,
        score: int,
        *,
        scale: Literal["thumb", "likert7"],
        user_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> FeedbackAck:
        """A rating of one response: `scale="thumb"` with score +1 or -1, or `"likert7"` with
        1 (worst) to 7 (best)."""
        key = idempotency_key or _calls.new_idempotency_key()
        req = _calls.rating_request(
            response, score, scale=scale, user_id=self._user(user_id), key=key
        )
        return self._submit(self._feedback.SubmitRating, req, idempotency_key, timeout_s)

    # -- plumbing -----------------------------------------------------------------------------

    def _user(self, user_id: str | None) -> str:
        return self.user_id if user_id is None else user_id

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def _submit(
        self, method: Callable[..., Any], req: Any, caller_key: str | None, timeout_s: float | None
    ) -> FeedbackAck:
        msg, attempts = self._unary(method, req, timeout_s, idempotent=True)
        return _calls.ack(msg, own_key=caller_key is None, attempts=attempts)

    def _unary(
        self, method: Callable[..., T], req: Any, timeout_s: float | None, *, idempotent: bool
    ) -> tuple[T, int]:
        """(the answer, how many tries it took); the same request on every try."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(
                    req, metadata=self._metadata, timeout=self._timeout(timeout_s)
                ), attempt
            except grpc.RpcError as e:
                if not self.retry.should_retry(e, attempt, idempotent=idempotent):
                    raise
            time.sleep(self.retry.backoff_s(attempt))
