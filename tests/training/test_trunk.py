"""A frozen lower trunk (`trainable_layers`): the split forward equals the full one, the frozen
weights never move, and the cached trunk gives the same batch and the same update as running
the whole frozen model again, in the reward model and in PPO."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ppo import (
    apple_fraction,
    fixed_rollouts,
    flat,
    load_policy_models,
    log_rows,
    run_cfg,
    small_cfg,
)

from instructloop.training.config import ConfigError, PPOConfig, RewardModelConfig, validate
from instructloop.training.models import pad_batch
from instructloop.training.ppo import (
    TrunkSplit,
    causal_lm_parts,
    load_ptx,
    make_batch,
    ppo_update,
    ptx_batches,
    run_ppo,
)
from instructloop.training.reward_model import backbone_and_head, run_reward_model
from instructloop.training.trunk import freeze_lower, lower_hidden, same_trunk, upper_hidden
from tests.support.data import GREEDY_TOKENS, greedy_prompts
from tests.support.engines import sampled_reward, vllm_greedy
from tests.support.reference import hf_greedy

CPU = torch.device("cpu")


def padded_batch(tokenizer: Any, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    rollouts = fixed_rollouts(tokenizer, data_dir)
    return pad_batch([r.prompt_ids + r.response_ids for r in rollouts], 0, CPU)


@pytest.mark.parametrize("n_frozen", [0, 1])
def test_lower_then_upper_is_the_whole_forward(
    tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path, n_frozen: int
) -> None:
    actor, _, critic = load_policy_models(tiny_sft.path)
    ids, attn = padded_batch(tiny_tokenizer, data_dir)
    assert int(attn.sum(1).min()) < ids.shape[1]  # some rows are padded
    for body in (causal_lm_parts(actor)[0], backbone_and_head(critic)[0]):
        with torch.no_grad():
            whole = body(input_ids=ids, attention_mask=attn).last_hidden_state
            split = upper_hidden(body, lower_hidden(body, ids, attn, n_frozen), attn, n_frozen)
        real = attn.bool()
        torch.testing.assert_close(split[real], whole[real], atol=1e-5, rtol=1e-5)
        assert len(body.layers) == 2 and not isinstance(body.norm, torch.nn.Identity)  # restored


def test_freeze_lower_freezes_embeddings_and_bottom_layers(tiny_sft: Any) -> None:
    actor, _, _ = load_policy_models(tiny_sft.path)
    body = causal_lm_parts(actor)[0]
    assert freeze_lower(body, None) == 0
    assert all(p.requires_grad for p in actor.parameters())
    assert freeze_lower(body, 1) == 1
    assert not body.embed_tokens.weight.requires_grad
    assert not any(p.requires_grad for p in body.layers[0].parameters())
    assert all(p.requires_grad for p in body.layers[1].parameters())
    assert all(p.requires_grad for p in body.norm.parameters())
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"trainable_layers must be in \[1, 2\]"):
            freeze_lower(body, bad)
    with pytest.raises(ValueError, match="Llama-style decoder"):
        freeze_lower(torch.nn.Linear(2, 2), 1)


def test_configs_refuse_bad_trainable_layers() -> None:
    with pytest.raises(ConfigError, match="trainable_layers must be >= 1"):
        validate(RewardModelConfig(trainable_layers=0))
    with pytest.raises(ConfigError, match="trainable_layers must be >= 1"):
        validate(PPOConfig(trainable_layers=0, gamma_ptx=0.0))
    with pytest.raises(ConfigError, match="use_lora and trainable_layers"):
        validate(PPOConfig(trainable_layers=1, use_lora=True, gamma_ptx=0.0))


def frozen_models(tiny_sft: Any, share_critic: bool) -> tuple[Any, Any, Any, TrunkSplit]:
    actor, ref, critic = load_policy_models(tiny_sft.path)
    body, critic_body = causal_lm_parts(actor)[0], backbone_and_head(critic)[0]
    split = TrunkSplit(
        actor=freeze_lower(body, 1),
        critic=freeze_lower(critic_body, 1),
        reference_shares_actor=True,
        critic_shares_actor=share_critic,
    )
    assert same_trunk(body, critic_body, 1)  # all three start from the same checkpoint
    return actor, ref, critic, split


def test_same_trunk_compares_only_the_frozen_weights(tiny_sft: Any) -> None:
    actor, _, critic = load_policy_models(tiny_sft.path)
    a, c = causal_lm_parts(actor)[0], backbone_and_head(critic)[0]
    assert same_trunk(a, c, 1) and same_trunk(a, c, 2)
    with torch.no_grad():
        c.layers[1].mlp.up_proj.weight.add_(0.1)  # above a 1-layer trunk
    assert same_trunk(a, c, 1) and not same_trunk(a, c, 2)
    with torch.no_grad():
        c.embed_tokens.weight[5].add_(0.1)
    assert not same_trunk(a, c, 1) and not same_trunk(a, c, 0)
    assert not same_trunk(a, torch.nn.Linear(2, 2), 1)


@pytest.mark.parametrize("share_critic", [False, True])
def test_make_batch_on_a_cached_trunk_equals_the_whole_forward(
    tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path, share_critic: bool
) -> None:
    actor, ref, critic, split = frozen_models(tiny_sft, share_critic)
    rollouts = fixed_rollouts(tiny_tokenizer, data_dir)
    kw: dict[str, Any] = dict(
        actor=actor, reference=ref, critic=critic, cfg=small_cfg(kl_coef=0.1),
        pad_id=tiny_tokenizer.pad_token_id, device=CPU,
    )  # fmt: skip
    whole = make_batch(rollouts, [1.0, -1.0, 0.5, 2.0], **kw)
    cached = make_batch(rollouts, [1.0, -1.0, 0.5, 2.0], **kw, trunk=split)
    assert whole.actor_lower is None and cached.actor_lower is not None
    assert (cached.critic_lower is cached.actor_lower) == share_critic
    assert (
        cached.critic_lower is not None and cached.critic_lower.shape[:2] == whole.input_ids.shape
    )
    for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        torch.testing.assert_close(
            getattr(cached, name), getattr(whole, name), atol=1e-5, rtol=1e-5, msg=name
        )
    # A minibatch keeps its rows of the cache, trimmed like the ids.
    mb = cached.select(torch.tensor([2, 0]))
    assert mb.actor_lower is not None
    assert mb.actor_lower.shape[:2] == mb.input_ids.shape
    torch.testing.assert_close(mb.actor_lower[1], cached.actor_lower[0, : mb.input_ids.shape[1]])


def test_ppo_update_on_a_cached_trunk_equals_the_frozen_model(
    tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path
) -> None:
    """Two PPO-ptx epochs over the cached trunks (rollouts and ptx corpus) move the weights
    exactly as two epochs that run the frozen trunk again every pass; the trunk itself does not
    move."""
    actor, ref, critic, split = frozen_models(tiny_sft, share_critic=True)
    rollouts = fixed_rollouts(tiny_tokenizer, data_dir)
    cfg = small_cfg(ppo_epochs=2, minibatch_size=2, gamma_ptx=0.5, ptx_path="unused")
    kw: dict[str, Any] = dict(
        actor=actor, reference=ref, critic=critic, cfg=cfg,
        pad_id=tiny_tokenizer.pad_token_id, device=CPU,
    )  # fmt: skip
    scores = [1.0, -1.0, 0.5, 2.0]
    seqs = load_ptx(str(data_dir / "ptx.jsonl"), tiny_tokenizer, 64)
    body = causal_lm_parts(actor)[0]
    calls: list[int] = []

    def trunk(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape[0])
        return lower_hidden(body, ids, attn, 1)

    runs = {
        "whole": (make_batch(rollouts, scores, **kw), ptx_batches(seqs, 0, 3, 0, CPU)),
        "cached": (
            make_batch(rollouts, scores, **kw, trunk=split),
            ptx_batches(seqs, 0, 3, 0, CPU, trunk=trunk, n_frozen=1, cache_bytes=1 << 30),
        ),
    }
    results = {}
    for name, (batch, ptx) in runs.items():
        a, c = copy.deepcopy(actor), copy.deepcopy(critic)
        params = [p for p in [*a.parameters(), *c.parameters()] if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        m = ppo_update(
            a, c, opt, batch, cfg, ptx_batches=ptx, generator=torch.Generator().manual_seed(0)
        )
        assert m["ptx_loss"] > 0
        results[name] = (a, c)
    (a_whole, c_whole), (a_cached, c_cached) = results["whole"], results["cached"]
    assert sum(calls) == 4 * 3  # 4 minibatches x 3 ptx sequences, none drawn twice yet
    # Float sums in another order differ in the last bits, and Adam's step (lr 1e-2 here) can
    # grow such a difference on a near-zero gradient to ~1e-5; a
    # wrong trunk would differ by the order of the step itself.
    torch.testing.assert_close(flat(a_cached), flat(a_whole), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flat(c_cached), flat(c_whole), atol=1e-4, rtol=1e-4)
    assert not torch.equal(flat(a_cached), flat(actor))  # the top layer trained
    for model, start in ((a_cached, actor), (c_cached, critic)):
        moved, base = model.state_dict(), start.state_dict()
        for name, t in moved.items():
            if "embed_tokens" in name or ".layers.0." in name:
                assert torch.equal(t, base[name]), name


def test_ptx_trunk_is_computed_once_per_sequence_within_the_cache_budget(
    tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path
) -> None:
    actor, _, _ = load_policy_models(tiny_sft.path)
    body = causal_lm_parts(actor)[0]
    freeze_lower(body, 1)
    seqs = load_ptx(str(data_dir / "ptx.jsonl"), tiny_tokenizer, 64)
    n = len(seqs)
    drawn: list[int] = []

    def trunk(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        drawn.append(ids.shape[0])
        return lower_hidden(body, ids, attn, 1)

    for budget, want in ((1 << 30, n), (0, 3 * n)):
        drawn.clear()
        it = ptx_batches(seqs, 0, 4, 0, CPU, trunk=trunk, n_frozen=1, cache_bytes=budget)
        plain = ptx_batches(seqs, 0, 4, 0, CPU)
        for _ in range(3 * n // 4):  # three passes over the corpus
            b, p = next(it), next(plain)
            assert torch.equal(b.input_ids, p.input_ids)  # same draws as without a trunk
            assert b.lower is not None
            with torch.no_grad():
                whole = lower_hidden(body, b.input_ids, b.attention_mask, 1)
            real = b.attention_mask.bool()
            torch.testing.assert_close(b.lower[real], whole[real], atol=1e-6, rtol=1e-6)
        assert sum(drawn) == want, budget


def test_reward_model_trains_only_the_top_layers(
    tmp_path: Path, tiny_sft: Any, data_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = RewardModelConfig(
        model_path=str(tiny_sft.path), train_path=str(data_dir / "rankings.jsonl"),
        output_dir=str(tmp_path / "rm"), epochs=3, batch_size=4, lr=3e-3, head_lr=1e-2,
        val_fraction=0.25, progress=False, trainable_layers=1,
    )  # fmt: skip
    info = run_reward_model(cfg)
    assert info.manifest["metrics"]["val_accuracy"] >= 0.9  # "more apples is better"
    rm = AutoModelForSequenceClassification.from_pretrained(info.path, dtype=torch.float32)
    sft = AutoModelForCausalLM.from_pretrained(tiny_sft.path, dtype=torch.float32)
    base = sft.model.state_dict()
    moved = {n: not torch.equal(t, base[n]) for n, t in rm.model.state_dict().items()}
    assert not any(v for n, v in moved.items() if "embed_tokens" in n or n.startswith("layers.0."))
    assert any(v for n, v in moved.items() if n.startswith("layers.1."))
    with pytest.raises(ConfigError, match=r"trainable_layers must be in \[1, 2\]"):
        run_reward_model(
            RewardModelConfig(**{**cfg.__dict__, "trainable_layers": 5, "overwrite": True})
        )


@pytest.mark.slow
def test_ppo_with_a_frozen_trunk_syncs_the_engine_and_keeps_the_trunk(
    tmp_path: Path, tiny_sft: Any, data_dir: Path, tiny_tokenizer: Any, rollout_engine: Any
) -> None:
    """run_ppo with trainable_layers: the saved actor's trunk is the SFT model's, its top layer
    moved, the reward rose, and the engine generates exactly as transformers on the saved
    actor (the partly trained policy reached the engine)."""
    from transformers import AutoModelForCausalLM

    # One trainable layer of two learns more slowly than the whole model: more steps on larger
    # batches. Judged on 384 fresh samples of each policy, not on the log's noisy 32-sample rows
    # (over 16 steps the log's rows barely move while fresh samples rise clearly); 24 steps
    # leave a margin over the threshold below on every seed tried.
    cfg = run_cfg(tmp_path, tiny_sft, data_dir, batch_size=32, total_episodes=32 * 24,
                  trainable_layers=1, lr=1e-2)  # fmt: skip
    info = run_ppo(cfg, apple_fraction, engine=rollout_engine)
    rows = log_rows(info)
    assert len(rows) == 24
    actor = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32)
    sft = AutoModelForCausalLM.from_pretrained(tiny_sft.path, dtype=torch.float32)
    base = sft.state_dict()
    for name, t in actor.state_dict().items():
        frozen = "embed_tokens" in name or ".layers.0." in name or name == "lm_head.weight"
        assert torch.equal(t, base[name]) == frozen, name
    prompts = greedy_prompts(data_dir, tiny_tokenizer)
    assert vllm_greedy(rollout_engine, prompts, GREEDY_TOKENS) == hf_greedy(
        actor, prompts, GREEDY_TOKENS
    )
    # Last: this reloads the engine (run_ppo's own sync is what the greedy check above tests).
    every = greedy_prompts(data_dir, tiny_tokenizer, n=48)
    before = sampled_reward(rollout_engine, tiny_sft.path, every, apple_fraction)
    after = sampled_reward(rollout_engine, info.path, every, apple_fraction)
    assert after > before + 0.3, (before, after, [r["reward"] for r in rows])
