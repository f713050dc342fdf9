"""The ptx corpus: a stand-in for the policy's pretraining distribution.

PPO-ptx (InstructGPT eq. 2) adds γ · E_x~D_pretrain[log π(x)], and the alignment tax is measured
as LM loss on held-out pretraining-like text. The real pretraining corpus of the default model is
not here (no hub), so we use the initial policy's own samples on general prompts, with no
constraints: "what the model did before RL". Raising its likelihood under RL keeps the policy close
to its starting behaviour on ordinary requests, which is the role the paper gives the ptx term.

Each row is {"text": chat-formatted prompt + response (+ EOS when the sample ended on it)}, the
export's `ptx.jsonl` layout. Train and held-out rows come from disjoint subjects (the same
subject-hash split as the constraint prompts), so the alignment-tax loss is measured on text the
ptx term never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructloop.training.data.constraints import SUBJECTS, ConstraintConfig, Split, split_of
from instructloop.training.data.generation import Sampler

# General requests with no verifiable constraint (different wording from constraints.TASKS).
GENERAL_TASKS: tuple[str, ...] = (
    "Tell me about {s}.",
    "What are a few interesting facts about {s}?",
    "Write a paragraph about {s}.",
    "What are the good and bad sides of {s}?",
    "How would you describe {s} to someone who has never seen it?",
)


def general_prompts(split: Split, cfg: ConstraintConfig | None = None) -> list[str]:
    """Every general task × every subject of `split` (deterministic order)."""
    return [t.format(s=s) for s in SUBJECTS if split_of(s, cfg) == split for t in GENERAL_TASKS]


@dataclass(frozen=True)
class PtxConfig:
    """How the corpus is sampled (ours: the paper mixes in its real pretraining data)."""

    samples_per_prompt: int = 1
    temperature: float = 1.0  # the policy's own distribution, not its mode
    max_tokens: int = 128


def generate_ptx(
    sampler: Sampler, split: Split, cfg: PtxConfig | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Sample the policy on the general prompts of `split`; rows are {"text"}."""
    cfg = cfg or PtxConfig()
    prompts: Sequence[str] = general_prompts(split)
    if limit is not None:
        prompts = prompts[:limit]
    eos = sampler.tokenizer.eos_token or ""
    outs = sampler.sample_full(
        list(prompts), n=cfg.samples_per_prompt, temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
    )  # fmt: skip
    return [
        {"text": c.prompt_text + c.text + (eos if c.stopped else "")}
        for cs in outs
        for c in cs
        if c.text.strip()
    ]


def write_shipped_corpus(model_dir: str, out_dir: str, cfg: PtxConfig | None = None) -> None:
    """Regenerate data/files/ptx_{train,heldout}.jsonl from `model_dir` (the default model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with Sampler(model_dir) as s:
        for split in ("train", "heldout"):
            rows = generate_ptx(s, split, cfg)  # type: ignore[arg-type]
            path = out / f"ptx_{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            print(f"{path}: {len(rows)} texts")


if __name__ == "__main__":
    import argparse

    from instructloop.paths import default_model_dir

    ap = argparse.ArgumentParser(description="Regenerate the shipped ptx corpus.")
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "files"))
    ap.add_argument("--max-tokens", type=int, default=PtxConfig.max_tokens)
    a = ap.parse_args()
    write_shipped_corpus(a.model, a.out_dir, PtxConfig(max_tokens=a.max_tokens))
