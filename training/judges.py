"""Judges for win rates: who answered a prompt better, policy A or policy B?

The paper's headline metric is the human preference rate of one model's outputs over another's
(§4.1; 175B InstructGPT wins 85 ± 3% against GPT-3). Here the judge is either
- a reward model (`RewardModelJudge`): r(x, y_A) against r(x, y_B); or
- a program (`ConstraintJudge`): the number of the prompt's verifiable constraints each answer
  meets (IFEval's checkers, the simulated labeller's criterion).
A tie counts half a win for each side, as is usual for preference rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from instructloop.training.data.constraints import ConstraintPrompt, score
from instructloop.training.runtime import offline_hub, resolve_device


class Judge(Protocol):
    """Scores answers; higher is better. `prompts[i]` is what `responses[i]` answers."""

    name: str

    def scores(self, prompts: Sequence[ConstraintPrompt], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response)."""
        ...


@dataclass(frozen=True)
class WinRate:
    """A's wins over B, ties as half a win."""

    win_rate: float
    wins: int
    ties: int
    losses: int
    n: int
    stderr: float  # binomial standard error of win_rate (the paper reports ±1 s.e.)

    def to_json(self) -> dict[str, float | int]:
        return {
            "win_rate": self.win_rate,
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "n": self.n,
            "stderr": self.stderr,
        }


def win_rate(
    scores_a: Sequence[float], scores_b: Sequence[float], *, tie_eps: float = 0.0
) -> WinRate:
    """Win rate of A over B from per-prompt scores; |a - b| <= tie_eps is a tie."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    if not scores_a:
        raise ValueError("no prompts to compare")
    if tie_eps < 0:
        raise ValueError("tie_eps must be >= 0")
    wins = ties = losses = 0
    for a, b in zip(scores_a, scores_b, strict=True):
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"non-finite score: {a}, {b}")
        if abs(a - b) <= tie_eps:
            ties += 1
        elif a > b:
            wins += 1
        else:
            losses += 1
    n = len(scores_a)
    p = (wins + 0.5 * ties) / n
    return WinRate(p, wins, ties, losses, n, math.sqrt(p * (1 - p) / n))


class ConstraintJudge:
    """Score = fraction of the prompt's IFEval constraints met (0 for an empty answer)."""

    name = "constraints"

    def scores(self, prompts: Sequence[ConstraintPrompt], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out = []
        for p, r in zip(prompts, responses, strict=True):
            met, total = score(p, r)
            out.append(met / total)
        return out


class RewardModelJudge:
    """Score = r(x, y) of a reward-model checkpoint (training/reward_model/), bias included.

    `prompt_texts[i]` is the exact text the policy saw (chat template applied); the RM scores
    prompt_text + response + EOS, as it was trained.
    """

    name = "reward_model"

    def __init__(
        self, path: str | Path, *, device: str = "auto", batch_size: int = 8, max_length: int = 1024
    ) -> None:
        offline_hub()  # before transformers is first imported
        # torch and transformers load only when a reward model judges.
        from instructloop.training.reward_model.scorer import RewardScorer

        self.path = str(path)
        self.scorer: Any = RewardScorer(
            path, device=resolve_device(device), batch_size=batch_size, max_length=max_length
        )

    def scores_text(self, prompt_texts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(x) for x in self.scorer.score(list(prompt_texts), list(responses))]

    def scores(self, prompts: Sequence[ConstraintPrompt], responses: Sequence[str]) -> list[float]:
        from instructloop.training.data.generation import chat_prompt_text

        texts = [chat_prompt_text(self.scorer.tokenizer, p.prompt) for p in prompts]
        return self.scores_text(texts, responses)


def judge_win_rate(
    judge: Judge,
    prompts: Sequence[ConstraintPrompt],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    *,
    tie_eps: float = 0.0,
) -> WinRate:
    """Win rate of A's answers over B's on the same prompts, by `judge`."""
    if not (len(prompts) == len(responses_a) == len(responses_b)):
        raise ValueError("prompts, responses_a and responses_b differ in length")
    return win_rate(
        judge.scores(prompts, responses_a), judge.scores(prompts, responses_b), tie_eps=tie_eps
    )
