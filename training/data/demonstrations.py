"""SFT demonstrations for constraint prompts: best-of-N samples of the policy that pass every check.

The paper's demonstrations are written by labellers (§3.4). Here nobody writes them; two stand-ins
were possible:
- programmatic templates ("<<title>>\\n* point\\n* point ... Any other questions?"): always correct,
  but text no model would write, so SFT on them mostly teaches the templates' style;
- rejection sampling: draw N samples from the policy and keep one that meets all the prompt's
  constraints. The text stays in the policy's own distribution, and the demonstrations are exactly
  what the simulated labeller ranks first.
We use rejection sampling. Prompts with no passing sample among the N get no demonstration (the
count is reported); the resulting set leans towards prompts the policy already handles sometimes,
which is also where the paper's labellers spent least effort. Rows use the export's `sft.jsonl`
layout: {"prompt", "prompt_text", "completion"}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from instructloop.training.data.constraints import ConstraintPrompt
from instructloop.training.data.generation import Completion, Sampler
from instructloop.training.data.simulated_users import judge


@dataclass(frozen=True)
class DemonstrationConfig:
    """Best-of-N settings (ours; the paper's demonstrations are human-written)."""

    n: int = 8  # samples per prompt
    temperature: float = 1.0  # the policy's own distribution (the paper samples RL at T = 1)
    max_tokens: int = 128
    # Among passing samples, keep the shortest that ended on EOS: short, finished answers make
    # the cleanest targets (a sample cut by max_tokens never teaches the model to stop).
    require_eos: bool = True


@dataclass(frozen=True)
class DemonstrationSet:
    rows: list[dict[str, Any]]
    n_prompts: int
    n_without_demo: int


def pick_demonstration(
    prompt: ConstraintPrompt, completions: Sequence[Completion], *, require_eos: bool = True
) -> Completion | None:
    """The shortest completion that meets all the prompt's constraints (and ended on EOS), and
    that the simulated users find nothing wrong with: no formatting nobody asked for, not
    degenerate (the shortest passing sample is otherwise often a near-empty one)."""

    def clean(text: str) -> bool:
        j = judge(prompt, text)
        return j.met == len(prompt.instruction_ids) and not j.unrequested and not j.is_degenerate

    ok = [c for c in completions if (c.stopped or not require_eos) and clean(c.text)]
    return min(ok, key=lambda c: c.n_tokens) if ok else None


def demonstration_row(prompt: ConstraintPrompt, c: Completion) -> dict[str, Any]:
    return {"prompt": prompt.prompt, "prompt_text": c.prompt_text, "completion": c.text}


def best_of_n_demonstrations(
    sampler: Sampler, prompts: Sequence[ConstraintPrompt], cfg: DemonstrationConfig | None = None
) -> DemonstrationSet:
    """Sample `cfg.n` answers per prompt with the policy and keep a passing one per prompt."""
    cfg = cfg or DemonstrationConfig()
    outs = sampler.sample_full(
        [p.prompt for p in prompts], n=cfg.n, temperature=cfg.temperature, max_tokens=cfg.max_tokens
    )
    rows = []
    for p, cs in zip(prompts, outs, strict=True):
        best = pick_demonstration(p, cs, require_eos=cfg.require_eos)
        if best is not None:
            rows.append(demonstration_row(p, best))
    return DemonstrationSet(
        rows=rows, n_prompts=len(prompts), n_without_demo=len(prompts) - len(rows)
    )
