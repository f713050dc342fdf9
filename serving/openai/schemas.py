"""The request shapes of the HTTP API (pydantic), and the gRPC requests they become.

A completion request is turned into the same `completion_pb2.CompletionRequest` a gRPC client
sends, so that one code path (serving/convert.py's `prepare`, then serving/completion_service.py)
checks, runs and logs both; feedback likewise becomes FeedbackService's requests. Checks here
are only what the gRPC shape cannot carry (OpenAI's `n` = 0 is an error where gRPC's means 1;
numbers outside the proto's integer types) and what the OpenAI API asks for that instructloop
cannot honour.

Unknown fields are ignored, as vLLM's server ignores them, except the OpenAI and vLLM
parameters that would change the answer and that instructloop does not implement (log
probabilities, tools, penalties, structured output, ...): a request that sets one of them to
anything but its default is refused (400), rather than answered as if it had not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from instructloop.serving.convert import MAX_SEED
from instructloop.serving.openai.errors import bad_param
from instructloop.v1 import completion_pb2, feedback_pb2

UINT32_MAX = 2**32 - 1
INT32 = (-(2**31), 2**31 - 1)
ROLE_ALIASES = {"developer": "system"}
"""OpenAI's newer name for the system role."""


def _off(*defaults: Any) -> Callable[[Any], bool]:
    """A parameter that is harmless only at one of `defaults` (None always is)."""
    return lambda v: v is None or any(v == d for d in defaults)


UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": _off(False),
    "top_logprobs": _off(0),
    "logit_bias": _off({}),
    "presence_penalty": _off(0),
    "frequency_penalty": _off(0),
    "repetition_penalty": _off(1),
    "top_k": _off(0, -1),
    "min_p": _off(0),
    "min_tokens": _off(0),
    "ignore_eos": _off(False),
    "best_of": _off(1),
    "echo": _off(False),
    "suffix": _off(""),
    "tools": _off([]),
    "tool_choice": _off("none", "auto"),
    "functions": _off([]),
    "function_call": _off("none", "auto"),
    "response_format": _off({"type": "text"}),
    "structured_outputs": _off({}),
    "guided_json": _off(),
    "guided_regex": _off(),
    "guided_choice": _off(),
    "guided_grammar": _off(),
    "audio": _off(),
    "modalities": _off(["text"]),
    "stop_token_ids": _off([]),
    "n_completions": _off(),
}
"""Parameters that change the answer and that instructloop does not implement -> whether a
value is harmless (the parameter's default). Anything else unknown is ignored."""


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Shape):
    include_usage: bool = False


class _Sampling(_Shape):
    """What both completion endpoints take."""

    model: str | None = None
    """Accepted and not checked: the live version answers whatever the name (it changes with
    every promotion); the answer's `model` names it."""
    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = None
    disable_logging: bool = False
    """instructloop's own: store nothing of this request (no feedback can refer to it)."""

    def refuse_unsupported(self) -> None:
        for name, harmless in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if value is not None and not harmless(value):
                raise bad_param(
                    name, f"{name} is not supported by instructloop (got {value!r}); leave it unset"
                )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _to_proto(self, max_tokens: int | None) -> completion_pb2.CompletionRequest:
        self.refuse_unsupported()
        req = completion_pb2.CompletionRequest(
            user_id=self.user or "",
            disable_logging=self.disable_logging,
        )
        if self.n is not None:
            if self.n < 1:
                raise bad_param("n", f"n must be at least 1, got {self.n}")
            req.n = min(self.n, UINT32_MAX)  # the shared check names the server's maximum
        if max_tokens is not None:
            if max_tokens < 0:
                raise bad_param(
                    "max_tokens",
                    "max_tokens must be at least 1 (leave it unset for the server's default)",
                )
            req.max_tokens = min(max_tokens, UINT32_MAX)
        if self.temperature is not None:
            req.temperature = self.temperature
        if self.top_p is not None:
            req.top_p = self.top_p
        if self.seed is not None:
            if not 0 <= self.seed <= MAX_SEED:
                raise bad_param("seed", f"seed must be 0 to {MAX_SEED}, got {self.seed}")
            req.seed = self.seed
        if self.stop is not None:
            req.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        if self.metadata:
            req.metadata.update(self.metadata)
        return req


class ChatMessage(_Shape):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    """OpenAI's newer name for max_tokens; wins when both are set (as in vLLM)."""

    def to_proto(self) -> completion_pb2.CompletionRequest:
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        req = self._to_proto(max_tokens)
        for i, m in enumerate(self.messages):
            if getattr(m, "tool_calls", None):
                raise bad_param(f"messages[{i}].tool_calls", "tool calls are not supported")
            req.messages.add(role=ROLE_ALIASES.get(m.role, m.role), content=_text(m.content, i))
        return req


def _text(content: str | list[dict[str, Any]] | None, i: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_param(
                f"messages[{i}].content[{j}]",
                f"only text content parts are supported, got type {part.get('type')!r}",
            )
        texts.append(part["text"])
    return "\n".join(texts)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]

    def to_proto(self) -> completion_pb2.CompletionRequest:
        req = self._to_proto(self.max_tokens)
        p = self.prompt
        if isinstance(p, list):
            if len(p) != 1 or not isinstance(p[0], str):
                raise bad_param(
                    "prompt",
                    "prompt must be one string (or a list of exactly one string); batches and "
                    "token ids are not supported: send one request per prompt",
                )
            p = p[0]
        req.prompt = p
        return req


# --- feedback ----------------------------------------------------------------------------------


class _Feedback(_Shape):
    user_id: str = ""
    idempotency_key: str = ""
    """Also read from the `Idempotency-Key` header when the body has none."""


class RankingRequest(_Feedback):
    completion_id: str
    ranked_response_ids: list[str]
    ranks: list[int] | None = None

    def to_proto(self) -> feedback_pb2.SubmitRankingRequest:
        for i, r in enumerate(self.ranks or ()):
            if not 0 <= r <= UINT32_MAX:
                raise bad_param(f"ranks[{i}]", f"ranks are 1 (best) or more, got {r}")
        return feedback_pb2.SubmitRankingRequest(
            user_id=self.user_id,
            idempotency_key=self.idempotency_key,
            completion_id=self.completion_id,
            ranked_response_ids=self.ranked_response_ids,
            ranks=self.ranks or (),
        )


class ComparisonRequest(_Feedback):
    chosen_response_id: str
    rejected_response_id: str
    tie: bool = False

    def to_proto(self) -> feedback_pb2.SubmitComparisonRequest:
        return feedback_pb2.SubmitComparisonRequest(
            user_id=self.user_id,
            idempotency_key=self.idempotency_key,
            chosen_response_id=self.chosen_response_id,
            rejected_response_id=self.rejected_response_id,
            tie=self.tie,
        )


RATING_SCALES = {
    "thumb": feedback_pb2.RATING_SCALE_THUMB,
    "likert7": feedback_pb2.RATING_SCALE_LIKERT_7,
    "likert_7": feedback_pb2.RATING_SCALE_LIKERT_7,
}


class RatingRequest(_Feedback):
    response_id: str
    scale: str
    """"thumb" (score +1 or -1) or "likert7" (score 1 to 7)."""
    score: int

    def to_proto(self) -> feedback_pb2.SubmitRatingRequest:
        scale = RATING_SCALES.get(self.scale.lower())
        if scale is None:
            raise bad_param("scale", f'scale must be "thumb" or "likert7", got {self.scale!r}')
        if not INT32[0] <= self.score <= INT32[1]:
            raise bad_param("score", f"score {self.score} is out of range")
        return feedback_pb2.SubmitRatingRequest(
            user_id=self.user_id,
            idempotency_key=self.idempotency_key,
            response_id=self.response_id,
            scale=scale,
            score=self.score,
        )
