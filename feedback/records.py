"""What is stored: completion records (with their responses) and feedback records.

A completion record holds everything the training side needs to rebuild the exact sample: the
prompt as the user gave it (`prompt` or `messages`), the text the engine saw (`prompt_text`, chat
template applied) and its token ids, the sampling parameters, the model version, the user, the
timestamps, and each response's text and token ids.

Feedback is one of three kinds:
- "ranking": K responses of one completion, best first, with dense ranks (1 = best; equal ranks
  tie), InstructGPT's K-way ranking (§3.5);
- "comparison": the K = 2 case, `chosen` over `rejected`, or a tie;
- "rating": one response scored on a thumb (+1/-1) or a 1-7 Likert scale.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

FeedbackKind = Literal["comparison", "ranking", "rating"]
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = ("comparison", "ranking", "rating")
RATING_SCALES = ("thumb", "likert7")


def new_id(prefix: str) -> str:
    """A fresh id such as `cmpl-<32 hex>`; prefixes: "cmpl", "resp", "fb"."""
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """One candidate answer of a completion."""

    response_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "response_id": self.response_id,
            "index": self.index,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "completion_tokens": self.completion_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResponseRecord:
        return cls(
            response_id=d["response_id"],
            index=int(d["index"]),
            text=d["text"],
            token_ids=[int(t) for t in d["token_ids"]],
            finish_reason=d["finish_reason"],
            completion_tokens=int(d["completion_tokens"]),
        )


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """One served completion request and all its responses, as logged."""

    completion_id: str
    model_version: str
    user_id: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    prompt_text: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    metadata: dict[str, str]
    created_at: float
    finished_at: float
    responses: list[ResponseRecord] = field(default_factory=list)
    principal: str = ""
    """Who called: the named owner of the API key (serving/auth.py); "" when authentication was
    off. `user_id` is the caller's own label within it."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "completion_id": self.completion_id,
            "model_version": self.model_version,
            "user_id": self.user_id,
            "prompt": self.prompt,
            "messages": self.messages,
            "prompt_text": self.prompt_text,
            "prompt_token_ids": list(self.prompt_token_ids),
            "sampling": self.sampling,
            "metadata": self.metadata,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "responses": [r.to_dict() for r in self.responses],
            "principal": self.principal,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompletionRecord:
        return cls(
            completion_id=d["completion_id"],
            model_version=d["model_version"],
            user_id=d["user_id"],
            prompt=d.get("prompt"),
            messages=d.get("messages"),
            prompt_text=d["prompt_text"],
            prompt_token_ids=[int(t) for t in d["prompt_token_ids"]],
            sampling=dict(d.get("sampling") or {}),
            metadata=dict(d.get("metadata") or {}),
            created_at=float(d["created_at"]),
            finished_at=float(d["finished_at"]),
            responses=[ResponseRecord.from_dict(r) for r in d["responses"]],
            principal=d.get("principal") or "",
        )

    @classmethod
    def from_json(cls, s: str | bytes) -> CompletionRecord:
        return cls.from_dict(json.loads(s))

    def response(self, response_id: str) -> ResponseRecord:
        for r in self.responses:
            if r.response_id == response_id:
                return r
        raise KeyError(f"response {response_id} is not part of completion {self.completion_id}")


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One stored judgement. Fields that do not belong to its kind keep their defaults.

    - ranking: `response_ids` best first, `ranks` dense from 1 (equal = tie);
    - comparison: `chosen_response_id`, `rejected_response_id`, `tie`;
    - rating: `response_id`, `scale` ("thumb" or "likert7"), `score`.
    `completion_id` is always set (for comparisons and ratings the store looks it up).
    `idempotency_key` is "" when the caller sent none.
    """

    feedback_id: str
    kind: FeedbackKind
    user_id: str
    idempotency_key: str
    completion_id: str
    created_at: float
    response_ids: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    chosen_response_id: str | None = None
    rejected_response_id: str | None = None
    tie: bool = False
    response_id: str | None = None
    scale: str | None = None
    score: int | None = None
    principal: str = ""
    """Who submitted it: the API key's principal ("" with authentication off); `user_id` is a
    label within it."""

    def ordering(self) -> tuple[list[str], list[int]]:
        """The judgement as a ranking group: ids best first and their dense ranks.

        A comparison is the K = 2 group ([chosen, rejected], [1, 2]), or [1, 1] for a tie.
        """
        if self.kind == "ranking":
            return list(self.response_ids), list(self.ranks)
        if self.kind == "comparison":
            assert self.chosen_response_id and self.rejected_response_id
            return [self.chosen_response_id, self.rejected_response_id], (
                [1, 1] if self.tie else [1, 2]
            )
        raise ValueError("a rating is not a ranking group")

    def data(self) -> dict[str, Any]:
        """The kind-specific fields (what the store keeps as the record's `data`)."""
        if self.kind == "ranking":
            return {
                "completion_id": self.completion_id,
                "response_ids": list(self.response_ids),
                "ranks": list(self.ranks),
            }
        if self.kind == "comparison":
            return {
                "chosen_response_id": self.chosen_response_id,
                "rejected_response_id": self.rejected_response_id,
                "tie": self.tie,
            }
        return {"response_id": self.response_id, "scale": self.scale, "score": self.score}

    def to_dict(self) -> dict[str, Any]:
        return {
            "feedback_id": self.feedback_id,
            "kind": self.kind,
            "user_id": self.user_id,
            "idempotency_key": self.idempotency_key,
            "completion_id": self.completion_id,
            "created_at": self.created_at,
            "principal": self.principal,
            **self.data(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeedbackRecord:
        kind = d["kind"]
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"unknown feedback kind {kind!r}")
        common: dict[str, Any] = {
            "feedback_id": d["feedback_id"],
            "kind": kind,
            "user_id": d["user_id"],
            "idempotency_key": d.get("idempotency_key") or "",
            "completion_id": d["completion_id"],
            "created_at": float(d["created_at"]),
            "principal": d.get("principal") or "",
        }
        if kind == "ranking":
            return cls(
                **common,
                response_ids=list(d["response_ids"]),
                ranks=[int(r) for r in d["ranks"]],
            )
        if kind == "comparison":
            return cls(
                **common,
                chosen_response_id=d["chosen_response_id"],
                rejected_response_id=d["rejected_response_id"],
                tie=bool(d["tie"]),
            )
        return cls(**common, response_id=d["response_id"], scale=d["scale"], score=int(d["score"]))

    @classmethod
    def from_json(cls, s: str | bytes) -> FeedbackRecord:
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_redis_hash(cls, h: dict[str, str]) -> FeedbackRecord:
        """Rebuild from the hash the store writes (`fb:<id>`: common fields plus `data`)."""
        d: dict[str, Any] = dict(json.loads(h["data"]))
        d.update(
            feedback_id=h["feedback_id"],
            kind=h["kind"],
            user_id=h["user_id"],
            idempotency_key=h.get("idempotency_key", ""),
            completion_id=h["completion_id"],
            created_at=h["created_at"],
            principal=h.get("principal", ""),
        )
        return cls.from_dict(d)
