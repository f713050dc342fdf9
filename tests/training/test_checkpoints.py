"""Checkpoints: written atomically, with a manifest; each stage's checkpoint loads in
transformers and in vLLM and computes the same thing there."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from instructloop.training.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from instructloop.training.datafiles import encode_prompt_response
from instructloop.training.reward_model import RewardScorer
from tests.support.data import GREEDY_TOKENS, greedy_prompts
from tests.support.engines import vllm_greedy
from tests.support.reference import hf_greedy


def tiny_write(model: Any, tok: Any, out: Path, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        model=model, tokenizer=tok, stage="sft", config={"lr": 1.0}, metrics={"loss": 2.0},
        parent_path="/src", parent_version="v3", data_snapshot="snap-x", save_dtype="bfloat16",
    )  # fmt: skip
    args.update(kw)
    return write_checkpoint(out, **args)


@pytest.fixture
def model_and_tok(tiny_model_dir: Path, tiny_tokenizer: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tiny_tokenizer


def test_checkpoint_layout_and_manifest(model_and_tok: Any, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, tok = model_and_tok
    info = tiny_write(model, tok, tmp_path / "ckpt")
    m = json.loads((tmp_path / "ckpt" / MANIFEST_NAME).read_text())
    assert m == info.manifest
    assert m["format"] == "instructloop-checkpoint/1" and m["stage"] == "sft"
    assert (m["parent_version"], m["data_snapshot"], m["parent_path"]) == ("v3", "snap-x", "/src")
    assert m["config"] == {"lr": 1.0} and m["metrics"] == {"loss": 2.0}
    # bf16 on disk, the tied head not stored twice, the master weights untouched in memory.
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
    assert next(model.parameters()).dtype == torch.float32
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    assert (tmp_path / "ckpt" / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (tmp_path / "ckpt" / "tokenizer_config.json").read_text()
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    want = model.model.embed_tokens.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded.model.embed_tokens.weight, want)


def test_write_is_atomic(model_and_tok: Any, tmp_path: Path) -> None:
    model, tok = model_and_tok
    out = tmp_path / "ckpt"

    def crash(tmp: Path) -> None:
        assert (tmp / MANIFEST_NAME).exists()  # complete, but not yet renamed
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        tiny_write(model, tok, out, before_rename=crash)
    assert os.listdir(tmp_path) == []  # neither the checkpoint nor a temp directory

    first = tiny_write(model, tok, out)
    with pytest.raises(CheckpointError, match="exists"):
        tiny_write(model, tok, out, metrics={"loss": 1.0})
    assert read_checkpoint(out).metrics == first.metrics
    # A failed overwrite leaves the old checkpoint in place.
    with pytest.raises(OSError):
        tiny_write(model, tok, out, metrics={"loss": 1.0}, overwrite=True, before_rename=crash)
    assert read_checkpoint(out).metrics == {"loss": 2.0}
    tiny_write(model, tok, out, metrics={"loss": 1.0}, overwrite=True)
    assert read_checkpoint(out).metrics == {"loss": 1.0}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path)


@pytest.mark.slow
def test_sft_checkpoint_loads_in_vllm_and_transformers(
    tiny_sft: Any, data_dir: Path, tiny_tokenizer: Any, rollout_engine: Any
) -> None:
    """The session's engine was started fresh from the SFT checkpoint; its first greedy tokens
    equal transformers' on the same directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_sft.path, dtype=torch.float32)
    prompts = greedy_prompts(data_dir, tiny_tokenizer)
    want = hf_greedy(model, prompts, GREEDY_TOKENS)
    assert rollout_engine.initial_greedy == want
    # The SFT model answers with a word and stops: EOS is part of the response.
    assert any(seq and seq[-1] == tiny_tokenizer.eos_token_id for seq in want)


@pytest.mark.slow
def test_ppo_checkpoint_loads_in_a_fresh_vllm_engine(
    tmp_path: Path, tiny_sft: Any, data_dir: Path, tiny_tokenizer: Any, rollout_engine: Any
) -> None:
    from transformers import AutoModelForCausalLM

    from instructloop.training.config import PPOConfig
    from instructloop.training.ppo import run_ppo
    from instructloop.training.ppo.rollout import RolloutEngine

    cfg = PPOConfig(
        policy_path=str(tiny_sft.path), prompts_path=str(data_dir / "prompts.jsonl"),
        output_dir=str(tmp_path / "ppo"), batch_size=8, minibatch_size=8, total_episodes=8,
        lr=2e-2, warmup_steps=0, max_new_tokens=8, gamma_ptx=0.0, progress=False,
        parent_version="v2",
    )  # fmt: skip
    info = run_ppo(cfg, lambda p, r: [float(len(x)) for x in r], engine=rollout_engine)
    m = info.manifest
    assert m["stage"] == "ppo" and m["parent_version"] == "v2"
    assert m["data_snapshot"] == "snap-test-1" and m["config"]["kl_coef"] == 0.02
    assert m["metrics"]["steps"] == 1
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32)
    prompts = greedy_prompts(data_dir, tiny_tokenizer)
    with RolloutEngine(info.path, max_model_len=256) as fresh:
        assert vllm_greedy(fresh, prompts, GREEDY_TOKENS) == hf_greedy(
            model, prompts, GREEDY_TOKENS
        )


@pytest.mark.slow
def test_reward_model_checkpoint_loads_in_vllm_pooling(
    tiny_rm: Any, data_dir: Path, tiny_tokenizer: Any
) -> None:
    """vLLM serves the RM as a pooling model (classify: σ(raw score) at the last token); the
    reward is logit(p) + the stored bias, the same as RewardScorer's."""
    from vllm import LLM

    scorer = RewardScorer(tiny_rm.path)
    row = json.loads((data_dir / "rankings.jsonl").read_text().splitlines()[1])
    seqs = [
        encode_prompt_response(tiny_tokenizer, row["prompt_text"], r, 256)[0]
        for r in row["responses"]
    ]
    want = scorer.score_ids(seqs)
    llm = LLM(model=str(tiny_rm.path), runner="pooling", dtype="float32", enforce_eager=True,
              max_model_len=256)  # fmt: skip
    try:
        outs = llm.classify([{"prompt_token_ids": s} for s in seqs], use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    got = [math.log(o.outputs.probs[0] / (1 - o.outputs.probs[0])) + scorer.bias for o in outs]
    assert got == pytest.approx(want, abs=1e-3)
    assert got[0] > got[-1]  # and it still prefers more apples
