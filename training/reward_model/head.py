"""The reward model's scalar head on the policy's backbone: r_θ(x, y) read at the last token.

A reward model here is transformers' `AutoModelForSequenceClassification` with num_labels = 1.
The head is applied at every position (`token_scores`, which PPO's critic reads as values) or at
the last real token (`sequence_rewards`, the reward). The bias that centres the reference scores
and their std are stored in config.json under `BIAS_KEY` and `STD_KEY`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from instructloop.training.trunk import upper_hidden

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BIAS_KEY = "instructloop_reward_bias"
STD_KEY = "instructloop_reward_std"


def reward_pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A pad id that is not EOS, when the tokenizer has one (pad, then unk), so that
    transformers' "last non-pad token" pooling lands on the EOS that ends the response."""
    eos = tokenizer.eos_token_id
    for cand in (tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None)):
        if cand is not None and cand != eos:
            return int(cand)
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)


def backbone_and_head(model: Any) -> tuple[Any, Any]:
    """(transformer body, scalar head) of a sequence-classification model, also through a peft
    wrapper (LoRA layers are injected in place, so calling the inner modules applies them)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.score


def token_scores(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    lower: torch.Tensor | None = None,
    n_frozen: int = 0,
):
    """The scalar head applied at every position: `[B, T]`. The RM reads the last real token; the
    critic (PPO's value model, initialised from the RM) reads every position. `lower`: the
    frozen trunk's output for these inputs (training/trunk.py), so only the top layers run."""
    body, head = backbone_and_head(model)
    if lower is not None:
        hidden = upper_hidden(body, lower, attention_mask, n_frozen)
    else:
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(hidden).squeeze(-1).float()


def sequence_rewards(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    lower: torch.Tensor | None = None,
    n_frozen: int = 0,
):
    """r(x, y) per row: the head at the last real token (rows are right-padded): `[B]`."""
    scores = token_scores(model, input_ids, attention_mask, lower=lower, n_frozen=n_frozen)
    last = attention_mask.sum(1) - 1
    return scores[torch.arange(scores.shape[0], device=scores.device), last]


__all__ = [
    "BIAS_KEY",
    "STD_KEY",
    "backbone_and_head",
    "reward_pad_token_id",
    "sequence_rewards",
    "token_scores",
]
