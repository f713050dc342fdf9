"""Shared helpers for the feedback tests (imported by file path via conftest's sys.path)."""

from __future__ import annotations

import time
from typing import Any

from instructloop.feedback.records import CompletionRecord, ResponseRecord, new_id


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


def chatml(messages: list[dict[str, str]]) -> str:
    """The prompt text a ChatML template (SmolLM2's) makes of messages."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def db_state(client: Any) -> dict[bytes, Any]:
    """Every key of the database with its value (and whether it expires), in a canonical form
    (DUMP is not: a hash's serialized field order can change without any write)."""
    state: dict[bytes, Any] = {}
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"string":
            value: Any = client.get(key)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"stream":
            value = client.xrange(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:  # pragma: no cover
            raise AssertionError(f"unexpected key type {kind!r}")
        state[key] = (kind, value, client.ttl(key) >= 0)
    return state


def ids(rec: CompletionRecord) -> list[str]:
    return [r.response_id for r in rec.responses]
