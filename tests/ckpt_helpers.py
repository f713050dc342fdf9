"""Checkpoints and references shared by the weight-swap tests (tests/test_weight_sync.py and
tests/serving/test_hot_swap.py): a copy of a model with every tensor changed, hand-edited broken
copies, and transformers greedy decoding as the independent reference.

Imported by name (pytest puts tests/ on sys.path through its conftest.py).
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructloop.serving.testing import perturb_checkpoint

__all__ = ["BF16_TIE", "edit_checkpoint", "hf_greedy", "perturb_checkpoint"]

# bf16 logits of ~20 are spaced 0.125 apart, so greedy decoding meets exact and near ties, which
# two kernels (or one vLLM CPU engine, run to run) may break either way. A top-2 gap up to this
# counts as a tie; wrong weights part ways at gaps of whole nats.
BF16_TIE = 0.25


def edit_checkpoint(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Copy `src` to `dst` with `edit` applied to its state dict (in place)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def hf_greedy(ckpt: Path, prompts: list[str], n: int, dtype: str) -> list[list[int]]:
    """transformers greedy decoding: argmax of the logits, step by step with its KV cache (no
    generate() logits processors, so EOS is just another token, as with vLLM's ignore_eos)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype))
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
            res = model(ids, use_cache=True)
            toks: list[int] = []
            for _ in range(n):
                nxt = int(res.logits[0, -1].argmax())
                toks.append(nxt)
                res = model(
                    torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True
                )
            out.append(toks)
    del model
    gc.collect()
    return out


QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give three tips for learning a new language.",
    "Explain what a prime number is.",
]


def chat_prompts(model_dir: Path, questions: list[str] = QUESTIONS) -> list[str]:
    """The questions as single-turn chats, rendered with the model's template (as served)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
