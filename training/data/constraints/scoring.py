"""IFEval's strict accuracy over many prompts, and the paired gain of one policy over another."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from instructloop.training.data.constraints.checkers import follows
from instructloop.training.data.constraints.records import ConstraintPrompt


@dataclass(frozen=True)
class IFEvalAccuracy:
    """IFEval's two strict metrics: all instructions of a prompt met, and each one met."""

    prompt_level: float
    instruction_level: float
    n_prompts: int
    n_instructions: int
    per_instruction: dict[str, float] = field(default_factory=dict)
    per_prompt: tuple[bool, ...] = ()
    """Whether each prompt met all its instructions, in the order scored (for paired
    comparisons of two policies on the same prompts)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_level": self.prompt_level,
            "instruction_level": self.instruction_level,
            "n_prompts": self.n_prompts,
            "n_instructions": self.n_instructions,
            "per_instruction": dict(self.per_instruction),
            "per_prompt": [int(x) for x in self.per_prompt],
        }


@dataclass(frozen=True)
class PairedGain:
    """Prompt-level accuracy of B minus A on the same prompts, with its paired standard error:
    the spread of the per-prompt differences (+1 gained, -1 lost, 0 same), not of either
    accuracy, so the noise of which prompts are easy cancels."""

    points: float
    standard_error_points: float
    gained: int
    lost: int
    n_prompts: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paired_gain(before: IFEvalAccuracy, after: IFEvalAccuracy) -> PairedGain:
    """`after` minus `before` in prompt-level points, both scored on the same prompts."""
    a, b = before.per_prompt, after.per_prompt
    if len(a) != len(b) or not a:
        raise ValueError(f"need per-prompt results on the same prompts, got {len(a)} and {len(b)}")
    d = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return PairedGain(
        # From the counts: 100 * 20 / 200 is exactly 10.0, where 100 * (0.375 - 0.275) of the
        # two accuracies is 9.999... and would miss a ">= 10" target.
        points=100 * sum(d) / n,
        standard_error_points=100 * (var / n) ** 0.5,
        gained=d.count(1),
        lost=d.count(-1),
        n_prompts=n,
    )


def accuracy(prompts: Sequence[ConstraintPrompt], responses: Sequence[str]) -> IFEvalAccuracy:
    """Prompt-level and instruction-level strict accuracy of `responses[i]` to `prompts[i]`."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("no prompts to score")
    per_prompt: list[bool] = []
    met: dict[str, list[bool]] = {}
    for p, r in zip(prompts, responses, strict=True):
        f = follows(p, r)
        per_prompt.append(all(f))
        for iid, ok in zip(p.instruction_ids, f, strict=True):
            met.setdefault(iid, []).append(ok)
    flat = [ok for v in met.values() for ok in v]
    return IFEvalAccuracy(
        prompt_level=sum(per_prompt) / len(prompts),
        instruction_level=sum(flat) / len(flat),
        n_prompts=len(prompts),
        n_instructions=len(flat),
        per_instruction={k: sum(v) / len(v) for k, v in sorted(met.items())},
        per_prompt=tuple(per_prompt),
    )


def per_instruction_accuracy(
    prompts: Sequence[ConstraintPrompt], answers: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per instruction id: how many prompts asked for it ("n"), how many answers met it ("met"),
    and the share ("accuracy"); ids in sorted order. IFEval's strict checkers."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    met: dict[str, list[bool]] = {}
    for p, a in zip(prompts, answers, strict=True):
        for iid, ok in zip(p.instruction_ids, follows(p, a), strict=True):
            met.setdefault(iid, []).append(ok)
    return {
        k: {"n": len(v), "met": sum(v), "accuracy": sum(v) / len(v)} for k, v in sorted(met.items())
    }
