"""A trained reward model used for scoring: SFT's checkpoint selection, PPO's rewards and the
evaluation's reward-model judge all read r(x, y) through `RewardScorer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from instructloop.training.datafiles import encode_prompt_response
from instructloop.training.models import load_tokenizer, pad_batch
from instructloop.training.reward_model.head import BIAS_KEY, STD_KEY, sequence_rewards
from instructloop.training.runtime import autocast


class RewardScorer:
    """A trained reward model for scoring: r(x, y) + bias, optionally normalised by the std
    stored at training."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        max_length: int = 1024,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
        mixed_precision: str = "no",
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        self.path = str(path)
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, dtype=dtype or torch.float32
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        self.bias = float(getattr(self.model.config, BIAS_KEY, 0.0) or 0.0)
        self.std = float(getattr(self.model.config, STD_KEY, 1.0) or 1.0)
        self.max_length = max_length
        self.batch_size = batch_size
        self.mixed_precision = mixed_precision
        """"bf16": score under bf16 autocast (PPO does when it trains under bf16)."""

    def score_ids(self, seqs: list[list[int]], *, normalize: bool = False) -> list[float]:
        """Rewards of token id sequences (prompt + response, EOS included when it ended)."""
        out: list[float] = [0.0] * len(seqs)
        pad = int(self.model.config.pad_token_id or 0)
        # Batches of similar lengths pad less; each score goes back to its place.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        with torch.no_grad(), autocast(self.device, self.mixed_precision):
            for i in range(0, len(order), self.batch_size):
                rows = order[i : i + self.batch_size]
                ids, attn = pad_batch([seqs[j] for j in rows], pad, self.device)
                r = sequence_rewards(self.model, ids, attn).float() + self.bias
                if normalize:
                    r = r / self.std
                for j, v in zip(rows, r.tolist(), strict=True):
                    out[j] = v
        return out

    def score(self, prompts: list[str], responses: list[str], **kw: Any) -> list[float]:
        """Rewards of (prompt text, response text) pairs; each response gets an EOS appended."""
        seqs = [
            encode_prompt_response(self.tokenizer, p, r, self.max_length)[0]
            for p, r in zip(prompts, responses, strict=True)
        ]
        return self.score_ids(seqs, **kw)

    __call__ = score


__all__ = ["RewardScorer"]
