"""transformers as the independent reference that the vLLM engines are checked against:
greedy tokens and token log-probabilities."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

BF16_TIE = 0.25
"""bf16 logits of ~20 are spaced 0.125 apart, so greedy decoding meets exact and near ties,
which two kernels (or one vLLM CPU engine, run to run) may break either way. A top-2 gap up to
this counts as a tie; wrong weights part ways at gaps of whole nats."""


def hf_greedy(
    model: Any, prompts: list[list[int]], n: int, *, ignore_eos: bool = False
) -> list[list[int]]:
    """transformers' greedy tokens, one prompt at a time (no padding): the argmax of the logits,
    step by step with the KV cache and no logits processors. A response ends after its EOS
    (included), unless `ignore_eos`: then EOS is just another token, as with vLLM's ignore_eos,
    and every response has `n` tokens."""
    import torch

    eos = model.generation_config.eos_token_id
    stop = set() if ignore_eos or eos is None else set(eos if isinstance(eos, list) else [eos])
    out = []
    with torch.no_grad():
        for p in prompts:
            res = model(torch.tensor([p]), use_cache=True)
            toks: list[int] = []
            while True:
                nxt = int(res.logits[0, -1].argmax())
                toks.append(nxt)
                if len(toks) == n or nxt in stop:
                    break
                res = model(
                    torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True
                )
            out.append(toks)
    return out


def checkpoint_greedy(ckpt: Path, prompts: list[str], n: int, dtype: str) -> list[list[int]]:
    """hf_greedy of the checkpoint at `ckpt`, loaded in `dtype`, on text prompts (no special
    tokens added): `n` tokens each, EOS being just another token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype))
    model.eval()
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    out = hf_greedy(model, ids, n, ignore_eos=True)
    del model
    gc.collect()
    return out


def hf_token_logprobs(model: Any, seqs: list[list[int]]) -> list[list[float]]:
    """transformers' log-probability of each token of each sequence given the tokens before it
    (the first token has none)."""
    import torch

    out = []
    for s in seqs:
        with torch.no_grad():
            logits = model(torch.tensor([s])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s[1:])[:, None])
        out.append(lp[:, 0].tolist())
    return out


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
