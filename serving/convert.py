"""Request conversion and validation: protobuf requests in, checked and turned into what the
engine and the feedback store take; engine output, store records and registry versions back into
protobuf. Every check answers INVALID_ARGUMENT with a precise message, and a rejected request
stores nothing."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import FeedbackError
from instructloop.feedback.records import CompletionRecord, ResponseRecord
from instructloop.feedback.store import Ack, FeedbackStore
from instructloop.registry import ModelVersion
from instructloop.serving.config import ServerConfig
from instructloop.serving.engine import Engine
from instructloop.serving.engine_types import EngineUnavailable, GenerationParams
from instructloop.serving.errors import invalid
from instructloop.v1 import completion_pb2, feedback_pb2, model_pb2

ROLES = ("system", "user", "assistant")
MAX_SEED = 2**63 - 1
LONG_PROMPT_CHARS = 64_000
"""Prompts longer than this are tokenized in a thread, off the event loop."""
RATING_SCALES = {
    feedback_pb2.RATING_SCALE_THUMB: "thumb",
    feedback_pb2.RATING_SCALE_LIKERT_7: "likert7",
}


def timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


# --- completion requests -----------------------------------------------------------------------


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
    _check_sampling(req, cfg)
    if len(req.stop) > cfg.max_stop:
        raise invalid(f"at most {cfg.max_stop} stop strings, got {len(req.stop)}")
    for i, s in enumerate(req.stop):
        if not s:
            raise invalid(f"stop[{i}] is empty")
        if len(s) > cfg.max_stop_chars:
            raise invalid(f"stop[{i}] is {len(s)} characters; at most {cfg.max_stop_chars}")
    if len(req.user_id) > store_cfg.max_id_chars:
        raise invalid(f"user_id is {len(req.user_id)} characters; at most {store_cfg.max_id_chars}")


def _check_sampling(req: completion_pb2.CompletionRequest, cfg: ServerConfig) -> None:
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


async def prepare(
    req: completion_pb2.CompletionRequest,
    engine: Engine,
    cfg: ServerConfig,
    store: FeedbackStore,
) -> Prepared:
    """Check the request, render and tokenize its prompt, fit it into the model's context."""
    check_request(req, cfg, store.config)
    metadata = dict(req.metadata)
    try:
        store.check_metadata(metadata)
    except FeedbackError as e:
        raise invalid(str(e)) from None
    messages, prompt_text, ids = await _tokenize(req, engine)
    return Prepared(
        prompt=None if messages is not None else req.prompt,
        messages=messages,
        prompt_text=prompt_text,
        prompt_token_ids=ids,
        params=_generation_params(req, cfg, len(ids), engine.max_model_len),
        user_id=req.user_id,
        metadata=metadata,
        log=not req.disable_logging,
    )


async def _tokenize(
    req: completion_pb2.CompletionRequest, engine: Engine
) -> tuple[list[dict[str, str]] | None, str, list[int]]:
    """(messages or None, the prompt's text, its token ids)."""
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
    if len(prompt_text) > LONG_PROMPT_CHARS:
        ids = await asyncio.to_thread(engine.encode, prompt_text, add_special_tokens=add_special)
    else:
        ids = engine.encode(prompt_text, add_special_tokens=add_special)
    if not ids:
        raise invalid("the prompt has no tokens")
    return messages, prompt_text, ids


def _generation_params(
    req: completion_pb2.CompletionRequest, cfg: ServerConfig, n_prompt: int, ctx: int
) -> GenerationParams:
    """The engine's parameters, max_tokens checked against (or fitted into) the context."""
    room = ctx - n_prompt
    if room < 1:
        raise invalid(
            f"the prompt has {n_prompt} tokens; the model's context holds {ctx} tokens, "
            "prompt and output together"
        )
    if req.HasField("max_tokens"):
        if req.max_tokens > room:
            raise invalid(
                f"max_tokens {req.max_tokens} plus the prompt's {n_prompt} tokens exceeds the "
                f"model's context of {ctx} tokens (at most {room} for this prompt)"
            )
        max_tokens = int(req.max_tokens)
    else:
        max_tokens = min(cfg.default_max_tokens, room)
    return GenerationParams(
        n=max(1, int(req.n)),
        max_tokens=max_tokens,
        temperature=float(req.temperature) if req.HasField("temperature") else 1.0,
        top_p=float(req.top_p) if req.HasField("top_p") else 1.0,
        seed=int(req.seed) if req.HasField("seed") else None,
        stop=tuple(req.stop),
    )


# --- completion output -------------------------------------------------------------------------


@dataclass
class Candidate:
    """One candidate's output so far, under its response id."""

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


def completion_record(
    p: Prepared,
    completion_id: str,
    version: str,
    created: float,
    cands: list[Candidate],
    *,
    principal: str = "",
) -> CompletionRecord:
    """What the feedback store logs for a finished completion (of `principal`'s caller)."""
    return CompletionRecord(
        principal=principal,
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


def usage(p: Prepared, cands: list[Candidate]) -> completion_pb2.Usage:
    return completion_pb2.Usage(
        prompt_tokens=len(p.prompt_token_ids),
        completion_tokens=sum(len(c.token_ids) for c in cands),
    )


# --- feedback and models -----------------------------------------------------------------------


def rating_scale(scale: int) -> str:
    name = RATING_SCALES.get(scale)
    if name is None:
        raise invalid("scale is required: RATING_SCALE_THUMB or RATING_SCALE_LIKERT_7")
    return name


def feedback_ack(ack: Ack) -> feedback_pb2.FeedbackAck:
    return feedback_pb2.FeedbackAck(
        feedback_id=ack.feedback_id, duplicate=ack.duplicate, created=timestamp(ack.created_at)
    )


def model_version_pb(mv: ModelVersion) -> model_pb2.ModelVersion:
    return model_pb2.ModelVersion(
        version=mv.version,
        path=mv.path,
        parent=mv.parent or "",
        source=mv.source,
        created=timestamp(mv.created_at),
        data_snapshot=mv.data_snapshot or "",
        metrics=mv.metrics,
        gate=mv.gate or "",
        verified=mv.verified or "",
    )
