"""Prompts and data files of the training and weight-swap tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light"]
"""Words of the synthetic training tasks; each is one token of the SmolLM2 tokenizer."""

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give three tips for learning a new language.",
    "Explain what a prime number is.",
]

GREEDY_TOKENS = 12
"""How many greedy tokens the engine-against-transformers checks compare."""


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_prompt(tokenizer: Any, text: str) -> str:
    """`text` as a single-turn chat, rendered with the tokenizer's template (as served)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def chat_prompts(model_dir: Path, questions: list[str] = QUESTIONS) -> list[str]:
    """The questions as single-turn chats, rendered with the model's template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [chat_prompt(tok, q) for q in questions]


def greedy_prompts(data_dir: Path, tokenizer: Any, n: int = 4) -> list[list[int]]:
    """The token ids of the first `n` prompts of the data directory's prompts.jsonl."""
    rows = [json.loads(line) for line in (data_dir / "prompts.jsonl").read_text().splitlines()]
    return [tokenizer(r["prompt_text"], add_special_tokens=False)["input_ids"] for r in rows[:n]]


def scored_sequences(data_dir: Path, tokenizer: Any) -> list[list[int]]:
    """greedy_prompts, each followed by a fixed answer, for the token log-probability checks."""
    answer = tokenizer("apple river apple stone", add_special_tokens=False)["input_ids"]
    return [p + answer for p in greedy_prompts(data_dir, tokenizer)]
