"""One PPO step's experience as tensors (`RolloutBatch`), and the model passes over it: the
policy's log-probs of the sampled tokens and the critic's values.

Shapes: `[B, R]` tensors are per response token, left-aligned (row b's response starts at
column 0), padded on the right, with `mask` marking real tokens; `[B, T]` tensors are
prompt + response, right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from instructloop.training.losses import entropy_from_logprobs
from instructloop.training.reward_model.head import token_scores
from instructloop.training.trunk import upper_hidden


@dataclass(frozen=True)
class TrunkSplit:
    """How many bottom layers of the actor and the critic are frozen (`trainable_layers`), and
    which models share the actor's frozen trunk: the reference when it is the policy's starting
    point (the trunk never trains, so its output is the reference's too), the critic when its
    trunk holds the same weights (a reward model trained with the same trainable_layers)."""

    actor: int = 0
    critic: int = 0
    reference_shares_actor: bool = False
    critic_shares_actor: bool = False

    @property
    def active(self) -> bool:
        return self.actor > 0 or self.critic > 0


@dataclass
class RolloutBatch:
    """One PPO step's experience. `input_ids`/`attention_mask` are `[B, T]` prompt + response
    (right-padded); the rest is `[B, R]` per response token, or `[B]` per sequence."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    query_lens: torch.Tensor  # [B]
    response_ids: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R] float
    logprobs: torch.Tensor  # π_old(y_t), at rollout time
    ref_logprobs: torch.Tensor  # π_SFT(y_t)
    values: torch.Tensor  # V_old(s_t)
    rewards: torch.Tensor  # -β KL_t, + score at the last token
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # [B] the score added at the end (normalised, penalised, clipped)
    stats: dict[str, float] = field(default_factory=dict)
    # With `trainable_layers`: the frozen trunks' outputs `[B, T, H]`, computed once per rollout
    # and reused by every pass over it (training/trunk.py); None when the whole model trains.
    actor_lower: torch.Tensor | None = None
    critic_lower: torch.Tensor | None = None
    trunk: TrunkSplit = field(default_factory=TrunkSplit)

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        """The rows `idx`, trimmed to the longest sequence among them."""
        t = int(self.attention_mask[idx].sum(1).max())
        r = int(self.mask[idx].sum(1).max())
        return RolloutBatch(
            input_ids=self.input_ids[idx, :t],
            attention_mask=self.attention_mask[idx, :t],
            query_lens=self.query_lens[idx],
            response_ids=self.response_ids[idx, :r],
            mask=self.mask[idx, :r],
            logprobs=self.logprobs[idx, :r],
            ref_logprobs=self.ref_logprobs[idx, :r],
            values=self.values[idx, :r],
            rewards=self.rewards[idx, :r],
            advantages=self.advantages[idx, :r],
            returns=self.returns[idx, :r],
            scores=self.scores[idx],
            actor_lower=None if self.actor_lower is None else self.actor_lower[idx, :t],
            critic_lower=None if self.critic_lower is None else self.critic_lower[idx, :t],
            trunk=self.trunk,
        )


def response_positions(query_lens: torch.Tensor, r: int, t: int) -> torch.Tensor:
    """`[B, R]` index of the position whose output predicts response token j: the logits (and
    value) at query_len - 1 + j score token query_len + j. Clamped into range for padding."""
    j = torch.arange(r, device=query_lens.device)
    return (query_lens[:, None] - 1 + j[None, :]).clamp(max=t - 1)


def gather_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x `[B, T, ...]` at positions `[B, R]` -> `[B, R, ...]`."""
    if x.dim() == 2:
        return x.gather(1, pos)
    idx = pos[..., None].expand(-1, -1, x.shape[-1])
    return x.gather(1, idx)


def causal_lm_parts(model: Any) -> tuple[Any, Any]:
    """(transformer body, LM head) of a causal LM, also through a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def policy_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float,
    *,
    with_entropy: bool = False,
    lower: torch.Tensor | None = None,
    n_frozen: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y_<t) of the response tokens `[B, R]` (and the entropy of π at each).

    The LM head (hidden x vocabulary, the largest matmul of a small model) runs only at the
    response positions, not over the prompt. π is the distribution vLLM sampled from:
    softmax(logits / temperature). `lower`: the frozen trunk's output for this batch, so only
    the `n_frozen`-and-up layers run.
    """
    body, head = causal_lm_parts(model)
    if lower is not None:
        hidden = upper_hidden(body, lower, batch.attention_mask, n_frozen)
    else:
        hidden = body(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
    pos = response_positions(batch.query_lens, batch.mask.shape[1], hidden.shape[1])
    logits = head(gather_positions(hidden, pos)).float()
    if temperature != 1.0:  # a [B, R, vocab] pass saved in the usual case
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    ent = None
    if with_entropy:  # a metric: from the same log-softmax, outside the autograd graph
        with torch.no_grad():
            ent = entropy_from_logprobs(logp_all)
    return logp, ent


def critic_values(critic: Any, batch: RolloutBatch) -> torch.Tensor:
    """V(s_t) `[B, R]`: the value head at the position before each response token."""
    v = token_scores(
        critic,
        batch.input_ids,
        batch.attention_mask,
        lower=batch.critic_lower,
        n_frozen=batch.trunk.critic,
    )
    pos = response_positions(batch.query_lens, batch.mask.shape[1], v.shape[1])
    return gather_positions(v, pos)


__all__ = [
    "RolloutBatch",
    "TrunkSplit",
    "causal_lm_parts",
    "critic_values",
    "gather_positions",
    "policy_logprobs",
    "response_positions",
]
