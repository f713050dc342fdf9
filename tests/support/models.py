"""Tiny Llama checkpoints with the default model's tokenizer and chat template: small enough to
build, train and serve inside a test, in float32 so that vLLM and transformers compute alike."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TINY_SHAPE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "head_dim": 32,  # the smallest head size vLLM's CPU attention supports
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,  # as SmolLM2
}


def build_tiny_llama(
    out: Path,
    tokenizer_from: Path,
    seed: int = 0,
    *,
    max_position_embeddings: int = 2048,
    source_config: bool = False,
) -> Path:
    """A randomly initialised LlamaForCausalLM of TINY_SHAPE with `tokenizer_from`'s tokenizer,
    chat template and generation config, saved in float32.

    The config is LlamaConfig's defaults with the tokenizer's special tokens, or with
    `source_config` `tokenizer_from`'s own config shrunk to TINY_SHAPE (keeping its RoPE base
    and norm epsilon). The default of 2048 positions is what the evaluation sampler asks for."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    if source_config:
        cfg = AutoConfig.from_pretrained(tokenizer_from)
        for name, value in TINY_SHAPE.items():
            setattr(cfg, name, value)
        cfg.max_position_embeddings = max_position_embeddings
    else:
        cfg = LlamaConfig(
            vocab_size=len(tok),
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **TINY_SHAPE,
        )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config.dtype = torch.float32
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (Path(tokenizer_from) / name).exists():
            shutil.copyfile(Path(tokenizer_from) / name, out / name)
    return out


ANSWER_SET = ("Yes.", "No.", "Maybe, it depends.", "I am not sure about that at all.")


def build_tiny_answerer(
    out: Path, tokenizer_from: Path, topics: list[str], steps: int = 120, seed: int = 0
) -> Path:
    """The tiny Llama taught (causal-LM loss on the answer, chat template applied) to answer
    "Tell me about <topic>." with one of ANSWER_SET, each about equally often at T = 1: a policy
    with a real choice to make (1, 1, 3 or 7 words), small enough to train in a test."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_llama(out, tokenizer_from, seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(16):
            msgs = [{"role": "user", "content": f"Tell me about {rng.choice(topics)}."}]
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            p_ids = tok(prompt, add_special_tokens=False).input_ids
            a_ids = tok(rng.choice(ANSWER_SET) + tok.eos_token, add_special_tokens=False).input_ids
            rows.append((p_ids, a_ids))
        ids, mask, target = _answer_batch(rows)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        sel = target != -100  # the head only where there is a target: 49k-way logits are dear
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[sel]), target[sel])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def _answer_batch(
    rows: list[tuple[list[int], list[int]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and next-token targets (-100 outside the answer)
    of (prompt ids, answer ids) rows."""
    import torch

    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, -100)
    for i, (p_ids, a_ids) in enumerate(rows):
        seq = p_ids + a_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        target[i, len(p_ids) - 1 : len(seq) - 1] = torch.tensor(a_ids)
    return ids, mask, target
