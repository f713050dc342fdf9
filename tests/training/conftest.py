"""Fixtures of the training tests: a tiny random Llama built from the default model's tokenizer
and config (2 layers, hidden 64; nothing downloaded), small data sets written as the export
writes them, and checkpoints of each stage built once per session."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.data import GREEDY_TOKENS, WORDS, chat_prompt, greedy_prompts, write_jsonl
from tests.support.engines import vllm_greedy
from tests.support.models import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_llama(out, model_dir, source_config=True, max_position_embeddings=1024)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def data_dir(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export-like directory: sft.jsonl (repeat a word twice), rankings.jsonl (more copies of
    "apple" is better, with ties), prompts.jsonl, ptx.jsonl and a manifest."""
    d = tmp_path_factory.mktemp("export")
    rng = random.Random(0)
    sft, rankings, prompts, ptx = [], [], [], []
    for i in range(48):
        w = WORDS[i % len(WORDS)]
        p = chat_prompt(tiny_tokenizer, f"Repeat {w}")
        sft.append({"prompt_text": p, "completion": f"{w} {w}", "user_id": f"u{i % 6}"})
        prompts.append({"prompt_text": p})
        # K = 4 responses with 3, 2, 1 and 0 copies of "apple" (more is better); every 4th
        # ranking ties the two worst.
        other = WORDS[1 + (i + 3) % (len(WORDS) - 1)]
        responses = [" ".join(["apple"] * n + [other] * (3 - n)) for n in (3, 2, 1, 0)]
        ranks = [1, 2, 3, 3] if i % 4 == 0 else [1, 2, 3, 4]
        rankings.append(
            {"prompt_text": p, "responses": responses, "ranks": ranks, "user_id": f"u{i % 6}"}
        )
        ptx.append({"text": f"The {w} and the {other} are {rng.choice(WORDS)}."})
    write_jsonl(d / "sft.jsonl", sft)
    write_jsonl(d / "rankings.jsonl", rankings)
    write_jsonl(d / "prompts.jsonl", prompts)
    write_jsonl(d / "ptx.jsonl", ptx)
    (d / "manifest.json").write_text(json.dumps({"snapshot_id": "snap-test-1"}))
    return d


@pytest.fixture(scope="session")
def tiny_sft(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A short SFT run on the tiny model (selection by validation loss)."""
    from instructloop.training.config import SFTConfig
    from instructloop.training.sft import run_sft

    out = tmp_path_factory.mktemp("ckpt") / "sft"
    cfg = SFTConfig(
        model_path=str(tiny_model_dir),
        train_path=str(data_dir / "sft.jsonl"),
        output_dir=str(out),
        epochs=6,
        batch_size=8,
        lr=1e-2,  # a tiny model from scratch: it learns to answer with one of WORDS, then EOS
        residual_dropout=0.0,
        progress=False,
        parent_version="v1",
    )
    return run_sft(cfg)


@pytest.fixture(scope="session")
def tiny_rm(tiny_sft: Any, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A reward model trained from the tiny SFT checkpoint on the synthetic rankings."""
    from instructloop.training.config import RewardModelConfig
    from instructloop.training.reward_model import run_reward_model

    out = tmp_path_factory.mktemp("ckpt") / "rm"
    cfg = RewardModelConfig(
        model_path=str(tiny_sft.path),
        train_path=str(data_dir / "rankings.jsonl"),
        output_dir=str(out),
        epochs=2,
        batch_size=4,
        lr=3e-3,
        val_fraction=0.25,
        progress=False,
    )
    return run_reward_model(cfg)


@pytest.fixture(scope="session")
def rollout_engine(tiny_sft: Any, data_dir: Path, tiny_tokenizer: Any) -> Iterator[Any]:
    """One vLLM engine for the session's PPO tests, started from the tiny SFT checkpoint.
    run_ppo loads its actor into it first. `engine.initial_greedy` keeps its greedy tokens on
    `greedy_prompts` taken right after start (a fresh engine on the SFT checkpoint), whatever
    the tests do to it later."""
    from instructloop.training.ppo.rollout import RolloutEngine

    engine = RolloutEngine(tiny_sft.path, max_model_len=256, seed=0, kv_cache_gib=1)
    try:
        engine.initial_greedy = vllm_greedy(  # type: ignore[attr-defined]
            engine, greedy_prompts(data_dir, tiny_tokenizer), GREEDY_TOKENS
        )
        yield engine
    finally:
        engine.close()
