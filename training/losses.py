"""The losses of InstructGPT's three stages, as plain tensor functions.

Every function here is pure (tensors in, tensors out), so each one is tested against numbers
worked out by hand (tests/training/test_losses.py). Conventions:

- Per-token tensors are `[batch, time]` with a float `mask` of the same shape (1 = a real token
  of the part the loss is about, 0 = prompt or padding).
- `logprobs[b, t]` is log π(token t+1 | tokens ≤ t), i.e. already shifted: the logits at
  position t score the token at t+1 (see `token_logprobs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3"]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0.

    With `shift_mean=False` only the scale changes (used for rewards, whose sign means something).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if n > 1:  # unbiased, as numpy/TRL do; a single entry keeps var as is
        var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(x_{t+1} | x_≤t) for every position: `[B, T, V]` logits -> `[B, T-1]` log-probs.

    Computed in float32: bf16 log-softmax over a 49k vocabulary loses the small differences that
    PPO ratios are made of.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(π(·|x_≤t)) = -Σ_v p_v log p_v per position: `[B, T, V]` -> `[B, T]`."""
    return entropy_from_logprobs(F.log_softmax(logits.float(), dim=-1))


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """The same from log-probabilities already computed: `[B, T, V]` -> `[B, T]`."""
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------------------------
# SFT and ptx: causal-LM negative log-likelihood
# ---------------------------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the tokens where `loss_mask` is 1.

    `loss_mask` is `[B, T]` over the *input* positions (1 = this token is a target). SFT sets it on
    the response tokens only (the prompt is context, not something to imitate); the ptx term sets
    it on every real token. The mean is over target tokens of the whole batch, so long and short
    examples weigh by their token count, as in pretraining.
    """
    logp = token_logprobs(logits, input_ids)
    return -masked_mean(logp, loss_mask[:, 1:])


def ptx_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The pretraining term of PPO-ptx as a loss: -E_x~D_pretrain[log π(x)] (InstructGPT eq. 2,
    second term, per token). Multiply by γ_ptx where it is added to the PPO loss."""
    return lm_loss(logits, input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------
# Reward model: InstructGPT eq. 1, K responses per prompt as one batch element
# ---------------------------------------------------------------------------------------------


def ordered_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """All (winner, loser) index pairs of one ranking: i beats j when rank_i < rank_j.

    Tied responses (equal ranks) form no pair: a tie says neither is better, and eq. 1 has no term
    for it. A ranking of K distinct ranks gives C(K, 2) pairs; K = 2 is a plain comparison.
    """
    k = len(ranks)
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]


def kway_ranking_loss(rewards: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """InstructGPT eq. 1 for ONE prompt: -1/N · Σ_(w,l) log σ(r_w - r_l).

    `rewards` is `[K]`, one scalar per response, each from a single forward pass; `ranks[i]` is the
    rank of response i (1 = best, equal = tie). The sum runs over the N strictly ordered pairs;
    with no ties N = C(K, 2), the paper's normaliser. Tied pairs are left out of the sum AND of N,
    so a tie neither pulls the two rewards apart nor together, and each remaining comparison keeps
    the weight 1/N it would have in a tie-free ranking of the same pairs. A ranking that is all
    ties has no pairs: the loss is 0 (and carries no gradient), returned as such so the caller can
    skip it.
    """
    if rewards.dim() != 1 or rewards.shape[0] != len(ranks):
        raise ValueError(f"rewards must be [K] with K = len(ranks) = {len(ranks)}")
    pairs = ordered_pairs(ranks)
    if not pairs:
        return rewards.sum() * 0.0
    w = torch.tensor([p[0] for p in pairs], device=rewards.device)
    lo = torch.tensor([p[1] for p in pairs], device=rewards.device)
    return -F.logsigmoid(rewards[w] - rewards[lo]).mean()


def pairwise_accuracy(rewards: torch.Tensor, ranks: Sequence[int]) -> tuple[int, int]:
    """(correct, total) over the strictly ordered pairs: the RM is right when r_w > r_l."""
    pairs = ordered_pairs(ranks)
    correct = sum(1 for w, lo in pairs if rewards[w].item() > rewards[lo].item())
    return correct, len(pairs)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from tokens sampled from π (Schulman, "Approximating
    KL divergence", 2020). With log r = log π_ref(y_t) - log π(y_t):

    - k1 = -log r: unbiased, high variance, can be negative per token (InstructGPT eq. 2 uses
      exactly this, log π/π_SFT).
    - k2 = ½ (log r)²: biased, low variance, ≥ 0.
    - k3 = (r - 1) - log r: unbiased and ≥ 0 (OpenRLHF, TRL).
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        # Clamp before exp: a runaway ratio should give a big finite KL, not inf.
        return torch.expm1(log_r.clamp(max=20.0)) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over one response per row (Schulman et al., 2016).

    `rewards`, `values`, `mask`: `[B, R]`, response tokens left-aligned, padding on the right.
    The episode ends after the last real token (its next value is 0):
        δ_t = r_t + γ V_{t+1} - V_t,    A_t = δ_t + γ λ A_{t+1},    returns_t = A_t + V_t.
    InstructGPT uses γ = 1 (App. C.3). Padding positions get advantage and return 0.
    """
    mask = mask.to(values.dtype)
    b, r = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(r)):
        next_mask = mask[:, t + 1] if t + 1 < r else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < r else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        adv[:, t] = last
    adv = adv * mask
    returns = (adv + values) * mask
    return adv, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss to minimise (Schulman et al., 2017, eq. 7):
        L = -E_t[ min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε) A_t) ],   ρ_t = π(y_t) / π_old(y_t).
    ε = 0.2 in InstructGPT (App. C.3). Returns (loss, fraction of tokens where the clip bit).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ½ E_t[max((V - R)², (V_clip - R)²)], V_clip = V_old + clip(V - V_old, ±c)
    (PPO2 / TRL). `cliprange_value=None` gives the plain ½ E[(V - R)²].
    Returns (loss, fraction of tokens where the clipped term was the larger)."""
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def cosine_lr_factor(step: int, total_steps: int, final_fraction: float = 0.1, warmup: int = 0):
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay from 1 to
    `final_fraction` at `total_steps` (InstructGPT SFT/RM: to 10% of the peak, no warm-up)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))
