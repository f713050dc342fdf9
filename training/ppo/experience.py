"""Steps 1 to 4 of a PPO step, the experience (OpenRLHF's experience maker):

1. rollout: one response per prompt, sampled from the current policy on vLLM;
2. score: r_θ(x, y) from the reward model or a programmatic reward, shaped (rewards.py);
3. per-token reward: -β·KL_t against the frozen reference, plus the score at the last token;
4. advantages: GAE with γ = 1 on the critic's per-token values (the critic starts from the RM),
   whitened over the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from instructloop.training.config import PPOConfig
from instructloop.training.losses import gae, kl_estimate, masked_mean, masked_whiten
from instructloop.training.models import pad_batch
from instructloop.training.ppo.batch import (
    RolloutBatch,
    TrunkSplit,
    causal_lm_parts,
    critic_values,
    policy_logprobs,
)
from instructloop.training.ppo.data import PromptSampler
from instructloop.training.ppo.models import PPOModels
from instructloop.training.ppo.rewards import RolloutScorer, token_rewards
from instructloop.training.ppo.rollout import Rollout, RolloutEngine
from instructloop.training.reward_model.head import backbone_and_head
from instructloop.training.runtime import autocast
from instructloop.training.trunk import lower_hidden


@dataclass
class Experience:
    """A PPO step's batch and what the metrics log reports of its rollouts."""

    batch: RolloutBatch
    stats: dict[str, Any]
    rollout_seconds: float


def collect_experience(
    engine: RolloutEngine,
    prompts: PromptSampler,
    score: RolloutScorer,
    models: PPOModels,
    cfg: PPOConfig,
    *,
    pad_id: int,
    device: torch.device,
) -> Experience:
    """Steps 1-4 for the next `cfg.batch_size` prompts."""
    # 1. rollout on vLLM with the current policy
    t0 = time.perf_counter()
    chosen = prompts.take(cfg.batch_size)
    rollouts = engine.generate(
        [ids for _, ids in chosen],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
    )
    rollout_seconds = time.perf_counter() - t0
    # 2. score: RM (+ bias) or the programmatic reward
    raw, scores = score([t for t, _ in chosen], rollouts)
    # 3-4. per-token rewards (-β KL, score at the end), values, GAE advantages
    batch = make_batch(
        rollouts,
        scores,
        actor=models.actor,
        reference=models.reference,
        critic=models.critic,
        cfg=cfg,
        pad_id=pad_id,
        device=device,
        trunk=models.split,
    )
    lengths = [len(r.response_ids) for r in rollouts]
    stats = {
        "reward": sum(raw) / len(raw),
        "score": sum(scores) / len(scores),
        **batch.stats,
        "response_length": sum(lengths) / len(lengths),
        "eos_fraction": sum(r.ended_with_eos for r in rollouts) / len(rollouts),
    }
    return Experience(batch, stats, rollout_seconds)


def make_batch(
    rollouts: list[Rollout],
    scores: list[float],
    *,
    actor: Any,
    reference: Any,
    critic: Any,
    cfg: PPOConfig,
    pad_id: int,
    device: torch.device,
    trunk: TrunkSplit | None = None,
) -> RolloutBatch:
    """Log-probs of the sampled tokens under the actor (π_old) and the reference, the critic's
    values, per-token rewards, GAE advantages (whitened) and returns. With a `trunk` split, the
    frozen trunks run here once and their outputs stay in the batch for the update."""
    batch = layout(rollouts, scores, pad_id, device, trunk or TrunkSplit())
    mask = batch.mask
    score_old_policy(batch, actor, reference, critic, cfg, device)
    batch.rewards, kl = token_rewards(
        batch.scores, batch.logprobs, batch.ref_logprobs, mask, cfg.kl_coef, cfg.kl_estimator
    )
    adv, batch.returns = gae(batch.rewards, batch.values, mask, cfg.gamma, cfg.lam)
    batch.advantages = masked_whiten(adv, mask) if cfg.whiten_advantages else adv

    def seq_kl(estimator: str) -> float:  # mean over sequences of the per-token sum
        k = kl_estimate(batch.logprobs, batch.ref_logprobs, estimator)  # type: ignore[arg-type]
        return (k * mask).sum(1).mean().item()

    batch.stats = {
        "kl": (kl.sum(1)).mean().item(),  # the estimator used in the reward
        "kl_k1": seq_kl("k1"),
        "kl_k3": seq_kl("k3"),
        "nonscore_reward": (-cfg.kl_coef * kl).sum(1).mean().item(),
        "value_mean": masked_mean(batch.values, mask).item(),
        "advantage_mean_raw": masked_mean(adv, mask).item(),
    }
    return batch


def layout(
    rollouts: list[Rollout],
    scores: list[float],
    pad_id: int,
    device: torch.device,
    trunk: TrunkSplit,
) -> RolloutBatch:
    """The rollouts as a RolloutBatch: token ids, mask and scores; the per-token fields are
    zeros until `make_batch` fills them."""
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    ids, attn = pad_batch(seqs, pad_id, device)
    qlens = torch.tensor([len(r.prompt_ids) for r in rollouts], device=device)
    rmax = max(len(r.response_ids) for r in rollouts)
    resp = torch.full((len(rollouts), rmax), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rollouts), rmax), device=device)
    for i, r in enumerate(rollouts):
        resp[i, : len(r.response_ids)] = torch.tensor(r.response_ids, device=device)
        mask[i, : len(r.response_ids)] = 1.0
    zero = torch.zeros_like(mask)
    return RolloutBatch(
        input_ids=ids, attention_mask=attn, query_lens=qlens, response_ids=resp, mask=mask,
        logprobs=zero, ref_logprobs=zero, values=zero, rewards=zero, advantages=zero,
        returns=zero, scores=torch.tensor(scores, device=device, dtype=torch.float32),
        trunk=trunk,
    )  # fmt: skip


def score_old_policy(
    batch: RolloutBatch, actor: Any, reference: Any, critic: Any, cfg: PPOConfig, device: Any
) -> None:
    """Fill in π_old's and the reference's log-probs and the critic's values (no gradients). The
    frozen trunks, when there is a split, run once here and stay in the batch."""
    actor.eval()
    critic.eval()
    ids, attn, split = batch.input_ids, batch.attention_mask, batch.trunk
    with torch.no_grad(), autocast(device, cfg.mixed_precision):
        if split.active:
            batch.actor_lower = lower_hidden(causal_lm_parts(actor)[0], ids, attn, split.actor)
            batch.critic_lower = (
                batch.actor_lower
                if split.critic_shares_actor
                else lower_hidden(backbone_and_head(critic)[0], ids, attn, split.critic)
            )
        batch.logprobs, _ = policy_logprobs(
            actor, batch, cfg.temperature, lower=batch.actor_lower, n_frozen=split.actor
        )
        if reference is None:  # LoRA on the reference: the actor without its adapters
            with actor.disable_adapter():
                batch.ref_logprobs, _ = policy_logprobs(actor, batch, cfg.temperature)
        elif split.reference_shares_actor:  # the same frozen trunk: only its top layers run
            batch.ref_logprobs, _ = policy_logprobs(
                reference, batch, cfg.temperature, lower=batch.actor_lower, n_frozen=split.actor
            )
        else:
            batch.ref_logprobs, _ = policy_logprobs(reference, batch, cfg.temperature)
        batch.values = critic_values(critic, batch).float() * batch.mask
    batch.logprobs = batch.logprobs.float() * batch.mask
    batch.ref_logprobs = batch.ref_logprobs.float() * batch.mask


__all__ = ["Experience", "collect_experience", "layout", "make_batch", "score_old_policy"]
