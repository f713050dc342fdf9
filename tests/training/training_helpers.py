"""Helpers of the training tests (fixtures are in conftest.py): the tiny model, data files,
and greedy decoding with transformers and with the vLLM rollout engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Words of the synthetic tasks; each is one token of the SmolLM2 tokenizer (checked below).
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light"]


def build_tiny_model(src: Path, out: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """A random LlamaForCausalLM with the default model's tokenizer, chat template and config,
    shrunk to `layers` layers of width 64 (head_dim 32: vLLM's CPU attention needs >= 32),
    tied embeddings like SmolLM2, saved in float32 so vLLM and transformers compute alike."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers = layers
    cfg.hidden_size = 64
    cfg.intermediate_size = 128
    cfg.head_dim = 32
    cfg.num_attention_heads = 2
    cfg.num_key_value_heads = 1
    cfg.max_position_embeddings = 1024
    cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config.dtype = torch.float32
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    gen = Path(src) / "generation_config.json"
    if gen.exists():
        (out / "generation_config.json").write_text(gen.read_text())
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_prompt(tokenizer: Any, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def greedy_prompts(data_dir: Path, tokenizer: Any, n: int = 4) -> list[list[int]]:
    rows = [json.loads(line) for line in (data_dir / "prompts.jsonl").read_text().splitlines()]
    return [tokenizer(r["prompt_text"], add_special_tokens=False)["input_ids"] for r in rows[:n]]


def hf_greedy(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens, one prompt at a time (no padding), EOS included."""
    import torch

    out = []
    for p in prompts:
        with torch.no_grad():
            g = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=model.config.eos_token_id,
            )
        out.append(g[0, len(p) :].tolist())
    return out


def vllm_greedy(engine: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    rollouts = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return [r.response_ids for r in rollouts]


GREEDY_TOKENS = 12


def vllm_token_logprobs(engine: Any, seqs: list[list[int]]) -> list[list[float]]:
    """The engine's log-probability of each token of each sequence given the tokens before it
    (vLLM's prompt_logprobs; the first token has none). Unlike greedy tokens, these move with
    any weight change, so they tell two policies apart even where both answer alike."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = engine.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
    return [
        [lp[t].logprob for t, lp in zip(s[1:], o.prompt_logprobs[1:], strict=True)]
        for s, o in zip(seqs, outs, strict=True)
    ]


def hf_token_logprobs(model: Any, seqs: list[list[int]]) -> list[list[float]]:
    """transformers' log-probability of each token given the tokens before it (as above)."""
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


def scored_sequences(data_dir: Path, tokenizer: Any) -> list[list[int]]:
    """greedy_prompts, each followed by a fixed answer, for the token log-probability checks."""
    answer = tokenizer("apple river apple stone", add_special_tokens=False)["input_ids"]
    return [p + answer for p in greedy_prompts(data_dir, tokenizer)]


def sampled_reward(
    engine: Any,
    checkpoint: Path,
    prompts: list[list[int]],
    reward_fn: Any,
    *,
    reps: int = 8,
    max_new_tokens: int = 8,
) -> float:
    """Mean reward of `reps` samples per prompt (temperature 1) from `checkpoint`, loaded into
    the engine. 384 samples estimate it to about 0.015, a PPO log row's 32 to about 0.05."""
    engine.load_checkpoint(checkpoint)
    outs = engine.generate(prompts * reps, max_new_tokens=max_new_tokens, temperature=1.0)
    rewards = reward_fn([""] * len(outs), [o.text for o in outs])
    return sum(rewards) / len(rewards)
