"""Feedback records as the service logs them, and a feedback store seeded with rankings."""

from __future__ import annotations

import asyncio
import time

from instructloop.feedback.keys import DEFAULT_KEY_PREFIX
from instructloop.feedback.records import CompletionRecord, ResponseRecord, new_id

PROMPTS = [
    "Name a colour.",
    "Say something about the sea.",
    "Give me a word that rhymes with cat.",
    "What is two plus two?",
    "Write one short line about Redis.",
    "Name an animal that can fly.",
    "Describe rain in three words.",
    "Recommend a book.",
]
ANSWERS = ["blue", "It is a big blue sea.", "hat", "four", "Redis is fast.", "a bird"]


def chatml(messages: list[dict[str, str]]) -> str:
    """The prompt text a ChatML template (SmolLM2's) makes of messages."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def make_completion(
    k: int = 4,
    *,
    user_id: str = "app-user",
    messages: list[dict[str, str]] | None = None,
    prompt: str | None = "Write a haiku about Redis.",
    model_version: str = "v1",
) -> CompletionRecord:
    """A completion record with k responses whose texts are "answer 0", "answer 1", ..."""
    if messages is not None:
        prompt = None
    now = time.time()
    return CompletionRecord(
        completion_id=new_id("cmpl"),
        model_version=model_version,
        user_id=user_id,
        prompt=prompt,
        messages=messages,
        prompt_text=prompt if prompt is not None else chatml(messages or []),
        prompt_token_ids=[1, 2, 3],
        sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "n": k},
        metadata={"app": "tests"},
        created_at=now,
        finished_at=now + 0.5,
        responses=[
            ResponseRecord(new_id("resp"), i, f"answer {i}", [10 + i, 11 + i], "stop", 2)
            for i in range(k)
        ],
    )


def ids(rec: CompletionRecord) -> list[str]:
    """The record's response ids, in order."""
    return [r.response_id for r in rec.responses]


def seed_feedback(
    redis_url: str, n: int = 8, k: int = 4, prefix: str = DEFAULT_KEY_PREFIX
) -> list[str]:
    """Log `n` completions of k responses and rank each (shorter answers first: a
    programmatic preference); returns the feedback ids."""
    from instructloop.feedback.config import StoreConfig
    from instructloop.feedback.store import FeedbackStore

    async def go() -> list[str]:
        store = FeedbackStore.from_url(
            redis_url, StoreConfig(key_prefix=prefix, rate_limit_per_minute=0)
        )
        fb_ids = []
        try:
            for i in range(n):
                rec = _seeded_completion(i, k)
                await store.log_completion(rec)
                texts = [r.text for r in rec.responses]
                order = sorted(range(k), key=lambda j: (len(texts[j].strip()), j))
                ack = await store.submit_ranking(
                    user_id=rec.user_id,
                    idempotency_key=None,
                    completion_id=rec.completion_id,
                    ranked_response_ids=[rec.responses[j].response_id for j in order],
                )
                fb_ids.append(ack.feedback_id)
        finally:
            await store.close()
        return fb_ids

    return asyncio.run(go())


def _seeded_completion(i: int, k: int) -> CompletionRecord:
    """The i-th completion seed_feedback logs: a prompt of PROMPTS and k answers of ANSWERS,
    each made distinct by trailing spaces."""
    prompt = PROMPTS[i % len(PROMPTS)]
    messages = [{"role": "user", "content": prompt}]
    texts = [ANSWERS[(i + j) % len(ANSWERS)] + " " * j for j in range(k)]
    now = time.time()
    return CompletionRecord(
        completion_id=new_id("cmpl"),
        model_version="v1",
        user_id=f"user-{i % 3}",
        prompt=None,
        messages=messages,
        prompt_text=chatml(messages),
        prompt_token_ids=[1, 2, 3],
        sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "n": k},
        metadata={},
        created_at=now,
        finished_at=now,
        responses=[
            ResponseRecord(new_id("resp"), j, texts[j], [5, 6], "stop", 2) for j in range(k)
        ],
    )
