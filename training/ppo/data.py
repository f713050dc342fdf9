"""PPO's data: the prompts rollouts are sampled for, and the pretraining corpus of the ptx term
(eq. 2's second part), drawn in endless shuffled batches."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from instructloop.training.datafiles import DataError, prompt_text_of, read_jsonl
from instructloop.training.models import pad_batch
from instructloop.training.trunk import pad_hidden

Prompt = tuple[str, list[int]]
"""(prompt text, its token ids)."""


def load_prompts(path: str, tokenizer: Any, max_prompt_length: int) -> list[Prompt]:
    """(prompt text, token ids cut from the left to max_prompt_length), deduplicated by text."""
    out, seen = [], set()
    for n, row in enumerate(read_jsonl(path), 1):
        text = prompt_text_of(row, tokenizer, f"{path}:{n}")
        if text in seen:
            continue
        seen.add(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_length:]
        if not ids:
            raise DataError(f"{path}:{n}: empty prompt")
        out.append((text, ids))
    return out


class PromptSampler:
    """Draws prompts in epochs over the prompt set: each pass a fresh shuffle, seeded."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        self.prompts = prompts
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def take(self, n: int) -> list[Prompt]:
        chosen = []
        while len(chosen) < n:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            chosen.append(self.prompts[self.order.pop()])
        return chosen


@dataclass(frozen=True)
class PtxBatch:
    """Pretraining sequences for the ptx term, right-padded; `lower`: the actor's frozen trunk
    output for them `[B, T, H]` when the trunk is cached (trainable_layers), else None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lower: torch.Tensor | None = None
    n_frozen: int = 0


def load_ptx(path: str, tokenizer: Any, max_length: int) -> list[list[int]]:
    """The ptx corpus ({"text"} rows) as token ids, each cut to max_length; DataError when no
    text has 2 tokens or more (the loss needs a next token)."""
    texts = [r["text"] for r in read_jsonl(path, required=("text",)) if str(r["text"]).strip()]
    seqs = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise DataError(f"{path}: no text of at least 2 tokens")
    return seqs


TrunkFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""(ids, attention mask) -> the frozen trunk's output `[B, T, H]`."""


def ptx_batches(
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    *,
    trunk: TrunkFn | None = None,
    n_frozen: int = 0,
    cache_bytes: int = 0,
) -> Iterator[PtxBatch]:
    """Endless shuffled batches of the ptx corpus, with their own RNG so that plain PPO
    (γ_ptx = 0, never drawn from) runs exactly as without a corpus. With `trunk`, each batch
    carries the frozen trunk's output, computed the first time a sequence is drawn and kept
    (up to `cache_bytes`) for its later draws: the corpus is fixed and the trunk never trains."""
    rng = random.Random(seed)
    cache: dict[int, torch.Tensor] = {}
    cached_bytes = 0
    order: list[int] = []
    while True:
        chunk = []
        for _ in range(batch_size):
            if not order:  # a fresh shuffled pass over the corpus
                order = list(range(len(seqs)))
                rng.shuffle(order)
            chunk.append(order.pop())
        ids, attn = pad_batch([seqs[i] for i in chunk], pad_id, device)
        if trunk is None:
            yield PtxBatch(ids, attn)
            continue
        missing = [j for j, i in enumerate(chunk) if i not in cache]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            new = trunk(ids[missing], attn[missing])
            for row, j in enumerate(missing):
                i = chunk[j]
                fresh[i] = new[row, : len(seqs[i])]
                size = fresh[i].numel() * fresh[i].element_size()
                if i not in cache and cached_bytes + size <= cache_bytes:
                    cache[i] = fresh[i].clone()
                    cached_bytes += size
        rows = [cache.get(i, fresh.get(i)) for i in chunk]
        yield PtxBatch(ids, attn, pad_hidden(rows), n_frozen)  # type: ignore[arg-type]


def ptx_stream(
    path: str, tokenizer: Any, max_length: int, batch_size: int, seed: int, device: torch.device
) -> Iterator[PtxBatch]:
    """`load_ptx` then `ptx_batches` without a trunk: the file is read and checked here, before
    any batch is asked for."""
    seqs = load_ptx(path, tokenizer, max_length)
    return ptx_batches(seqs, tokenizer.pad_token_id, batch_size, seed, device)


__all__ = [
    "Prompt",
    "PromptSampler",
    "PtxBatch",
    "load_prompts",
    "load_ptx",
    "ptx_batches",
    "ptx_stream",
]
