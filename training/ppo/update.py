"""Step 5 of a PPO step: the PPO-ptx update, InstructGPT eq. 2 as gradients.

    objective(φ) = E_(x,y)~π_φ [ r_θ(x, y) - β log(π_φ(y|x) / π_SFT(y|x)) ]
                 + γ_ptx E_x~D_pretrain [ log π_φ(x) ]

The first term is optimised by PPO's clipped surrogate on the advantages of the experience
(whose rewards already hold the KL penalty), with the critic's clipped value loss beside it; the
second, the ptx term, by the LM loss on a pretraining batch, backpropagated in a second,
consecutive step into the same gradient buffers before the optimizer step (App. C.4).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from instructloop.training.config import PPOConfig
from instructloop.training.losses import masked_mean, ppo_policy_loss, ptx_loss, value_loss
from instructloop.training.ppo.batch import (
    RolloutBatch,
    causal_lm_parts,
    critic_values,
    policy_logprobs,
)
from instructloop.training.ppo.data import PtxBatch
from instructloop.training.runtime import autocast
from instructloop.training.trunk import upper_hidden


def ppo_update(
    actor: Any,
    critic: Any,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    cfg: PPOConfig,
    *,
    ptx_batches: Iterator[PtxBatch] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """`cfg.ppo_epochs` passes over `batch` in shuffled minibatches, one optimizer step each
    (`minibatch_update`). Returns mean metrics over the minibatches, with the number skipped."""
    dev = device or batch.input_ids.device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    n_mb = skipped = 0
    b = batch.input_ids.shape[0]
    actor.train()
    critic.train()
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(b, generator=generator)
        for i in range(0, b, cfg.minibatch_size):
            mb = batch.select(perm[i : i + cfg.minibatch_size].to(dev))
            row, stepped = minibatch_update(
                actor, critic, optimizer, params, mb, cfg, ptx_batches, dev
            )
            skipped += not stepped
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
            n_mb += 1
    out = {k: v / max(n_mb, 1) for k, v in sums.items()}
    out["skipped_minibatches"] = float(skipped)
    out["minibatches"] = float(n_mb)
    return out


def minibatch_update(
    actor: Any,
    critic: Any,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    mb: RolloutBatch,
    cfg: PPOConfig,
    ptx_batches: Iterator[PtxBatch] | None,
    dev: torch.device,
) -> tuple[dict[str, float], bool]:
    """One minibatch: PPO loss -> backward; then (γ_ptx > 0) γ_ptx · ptx loss on the next
    pretraining batch -> backward into the same buffers (App. C.4: "computed in consecutive
    steps and accumulated"); clip; one optimizer step. A minibatch whose loss or gradient is
    not finite is skipped (its gradients dropped). Returns (metrics, whether it stepped)."""
    with autocast(dev, cfg.mixed_precision):
        logp, ent = policy_logprobs(
            actor, mb, cfg.temperature, with_entropy=True, lower=mb.actor_lower,
            n_frozen=mb.trunk.actor,
        )  # fmt: skip
        values = critic_values(critic, mb)
    pg_loss, clipfrac = ppo_policy_loss(logp, mb.logprobs, mb.advantages, mb.mask, cfg.cliprange)
    vf_loss, vf_clipfrac = value_loss(values, mb.values, mb.returns, mb.mask, cfg.cliprange_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    ok = bool(torch.isfinite(loss))
    if ok:
        loss.backward()
    ptx_value = 0.0
    if ok and cfg.gamma_ptx > 0 and ptx_batches is not None:
        ok, ptx_value = ptx_backward(actor, next(ptx_batches), cfg, dev)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if ok else None
    stepped = ok and grad_norm is not None and bool(torch.isfinite(grad_norm))
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        approx_kl = masked_mean(0.5 * (logp - mb.logprobs) ** 2, mb.mask).item()
        ratio = masked_mean(torch.exp(logp - mb.logprobs), mb.mask).item()
    row = {
        "policy_loss": pg_loss.item(),
        "value_loss": vf_loss.item(),
        "ptx_loss": ptx_value,
        "clip_fraction": clipfrac.item(),
        "value_clip_fraction": vf_clipfrac.item(),
        "entropy": masked_mean(ent, mb.mask).item() if ent is not None else 0.0,
        "approx_kl": approx_kl,
        "ratio": ratio,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
    }
    return row, stepped


def ptx_backward(
    actor: Any, ptx_b: PtxBatch, cfg: PPOConfig, dev: torch.device
) -> tuple[bool, float]:
    """Eq. 2's second term, as its own backward pass into the same .grad buffers: γ_ptx times
    the LM loss of `ptx_b`. Returns (whether the loss was finite, the loss)."""
    with autocast(dev, cfg.mixed_precision):
        logits = ptx_logits(actor, ptx_b)
    lp = ptx_loss(logits, ptx_b.input_ids, ptx_b.attention_mask)
    if not bool(torch.isfinite(lp)):
        return False, 0.0
    (cfg.gamma_ptx * lp).backward()
    return True, lp.item()


def ptx_logits(actor: Any, b: PtxBatch) -> torch.Tensor:
    """The actor's logits over a ptx batch (from the cached trunk when there is one)."""
    if b.lower is None:
        return actor(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    body, head = causal_lm_parts(actor)
    return head(upper_hidden(body, b.lower, b.attention_mask, b.n_frozen))


__all__ = ["minibatch_update", "ppo_update", "ptx_backward", "ptx_logits"]
