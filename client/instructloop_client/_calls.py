"""What the sync and async clients share: channel settings, requests, the retry policy."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import grpc

from instructloop_client.types import Choice, Completion, FeedbackAck
from instructloop_client.v1 import completion_pb2, feedback_pb2

Message: TypeAlias = Mapping[str, str] | tuple[str, str] | completion_pb2.ChatMessage
"""A chat message: {"role": ..., "content": ...}, (role, content), or the proto message."""

Prompt: TypeAlias = str | Sequence[Message]
"""Raw text (sent to the model as is), or chat messages (rendered with its chat template)."""

Tls: TypeAlias = bool | str | os.PathLike[str] | bytes | grpc.ChannelCredentials
"""False: plaintext. True: TLS checked against the system's roots. A path or PEM bytes: TLS
checked against that CA. Channel credentials: as given (e.g. with a client certificate)."""

Response: TypeAlias = Choice | str
"""A response: a Choice of a Completion, or its response id."""

SCALES = {
    "thumb": feedback_pb2.RATING_SCALE_THUMB,
    "likert7": feedback_pb2.RATING_SCALE_LIKERT_7,
}

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # gRPC's reconnect backoff grows to 120 s by default: a client that saw the server restart
    # would find it again only minutes later, long after its retries gave up.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failed call is tried again.

    UNAVAILABLE (the server or its Redis is down or restarting, the connection broke) is retried
    for every call: the server answers it only when nothing was returned. DEADLINE_EXCEEDED is
    retried only for feedback, whose idempotency key makes a second delivery harmless (the
    server acknowledges the first record again); a completion that timed out may still be
    generating. A stream is retried only before its first chunk arrived. The pause before try
    k + 1 is `initial_backoff_s * multiplier ** (k - 1)`, capped at `max_backoff_s`, times a
    random factor in [0.5, 1] so that many clients do not come back at the same instant.
    """

    max_attempts: int = 8
    """Tries in all, the first included. With the backoff below they span 8 to 16 s: enough to
    ride out a server restart or a Redis failover; past that the caller should hear of it."""
    initial_backoff_s: float = 0.2
    """Quick enough that a blip costs little latency."""
    max_backoff_s: float = 5.0
    """Keeps trying at a useful rate while a restart takes its seconds."""
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (1: no retries)")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and the multiplier >= 1")

    def should_retry(self, err: grpc.RpcError, attempt: int, *, idempotent: bool) -> bool:
        """Whether try number `attempt` (from 1), which failed with `err`, gets another."""
        if attempt >= self.max_attempts:
            return False
        code = err.code() if callable(getattr(err, "code", None)) else None  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            return True
        return idempotent and code == grpc.StatusCode.DEADLINE_EXCEEDED

    def backoff_s(self, attempt: int) -> float:
        """The pause after try number `attempt` (from 1) failed."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)


NO_RETRY = RetryPolicy(max_attempts=1)


def credentials(tls: Tls) -> grpc.ChannelCredentials | None:
    if tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(root_certificates=tls)
    if isinstance(tls, str | os.PathLike):
        return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())
    raise TypeError(f"tls must be a bool, a CA file, PEM bytes or channel credentials: {tls!r}")


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def new_idempotency_key() -> str:
    return f"ilc-{uuid.uuid4().hex}"


def _chat(m: Message) -> completion_pb2.ChatMessage:
    if isinstance(m, completion_pb2.ChatMessage):
        return m
    if isinstance(m, tuple):
        role, content = m
        return completion_pb2.ChatMessage(role=role, content=content)
    return completion_pb2.ChatMessage(role=m["role"], content=m["content"])


def completion_request(
    prompt: Prompt,
    *,
    n: int,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: Sequence[str],
    user_id: str,
    metadata: Mapping[str, str] | None,
    disable_logging: bool,
) -> completion_pb2.CompletionRequest:
    req = completion_pb2.CompletionRequest(
        n=n,
        stop=list(stop),
        user_id=user_id,
        metadata=dict(metadata or {}),
        disable_logging=disable_logging,
    )
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.messages.extend(_chat(m) for m in prompt)
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if temperature is not None:
        req.temperature = temperature
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    return req


def response_id(r: Response) -> str:
    if isinstance(r, Choice):
        return r.response_id
    if isinstance(r, str):
        return r
    raise TypeError(f"a response is a Choice or a response id, not {type(r).__name__}")


def ranking_request(
    completion: Completion | str,
    order: Sequence[int | Response],
    *,
    ranks: Sequence[int] | None,
    user_id: str,
    key: str,
) -> feedback_pb2.SubmitRankingRequest:
    """`order`, best first: indexes into completion.choices, Choices or response ids."""
    choices = completion.choices if isinstance(completion, Completion) else None
    ids = []
    for o in order:
        if isinstance(o, int) and not isinstance(o, bool):
            if choices is None:
                raise ValueError("rank by choice index needs the Completion, not only its id")
            if not 0 <= o < len(choices):
                raise ValueError(
                    f"choice index {o} out of range: the completion has {len(choices)}"
                )
            ids.append(choices[o].response_id)
        else:
            ids.append(response_id(o))  # type: ignore[arg-type]
    cid = completion.completion_id if isinstance(completion, Completion) else completion
    return feedback_pb2.SubmitRankingRequest(
        user_id=user_id,
        idempotency_key=key,
        completion_id=cid,
        ranked_response_ids=ids,
        ranks=list(ranks or ()),
    )


def comparison_request(
    chosen: Response, rejected: Response, *, tie: bool, user_id: str, key: str
) -> feedback_pb2.SubmitComparisonRequest:
    return feedback_pb2.SubmitComparisonRequest(
        user_id=user_id,
        idempotency_key=key,
        chosen_response_id=response_id(chosen),
        rejected_response_id=response_id(rejected),
        tie=tie,
    )


def rating_request(
    response: Response,
    score: int,
    *,
    scale: Literal["thumb", "likert7"],
    user_id: str,
    key: str,
) -> feedback_pb2.SubmitRatingRequest:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return feedback_pb2.SubmitRatingRequest(
        user_id=user_id,
        idempotency_key=key,
        response_id=response_id(response),
        scale=SCALES[scale],
        score=score,
    )


def ack(msg: feedback_pb2.FeedbackAck, *, own_key: bool, attempts: int) -> FeedbackAck:
    """The acknowledgement as the caller sees it: when the client made the key and had to try
    again, a "duplicate" is the client's own earlier try, which reached the server but whose
    answer was lost, so the caller's one call is acknowledged as new."""
    a = FeedbackAck.from_proto(msg)
    if a.duplicate and own_key and attempts > 1:
        return FeedbackAck(a.feedback_id, False, a.created)
    return a
