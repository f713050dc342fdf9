"""The measurement on held-out prompts: greedy answers of the served version, not logged, and
their scores (IFEval accuracy, the paired gain, answer length, unrequested formatting)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

from benchmarks.online_learning.client import Session
from instructloop.training.data.constraints import (
    accuracy,
    paired_gain,
    per_instruction_accuracy,
)
from instructloop.training.data.simulated_users import (
    answer_words,
    unrequested_formatting_by_feature,
    unrequested_formatting_rate,
)

# What the scoring below uses from training/data (a test checks that each exists).
SCORING_HELPERS: dict[str, tuple[str, ...]] = {
    "instructloop.training.data.constraints": (
        "accuracy",
        "paired_gain",
        "per_instruction_accuracy",
    ),
    "instructloop.training.data.simulated_users": (
        "answer_words",
        "unrequested_formatting_rate",
        "unrequested_formatting_by_feature",
    ),
}


async def answers(s: Session, prompts: Sequence[Any], phase: str) -> tuple[list[str], Counter[str]]:
    """Greedy answers to `prompts`, several in flight; not logged, so that held-out prompts
    never reach a snapshot's PPO prompt set. Returns the answers and the versions seen."""
    sem = asyncio.Semaphore(s.cfg.concurrency)

    async def one(i: int, p: Any) -> tuple[str, str]:
        async with sem:
            req = s.request(
                p.prompt, n=1, max_tokens=s.cfg.eval_max_tokens, temperature=0.0,
                user_id=f"eval-{i % s.cfg.users}", disable_logging=True,
            )  # fmt: skip
            r = await s.complete(req, phase)
            return r.choices[0].text, r.model_version

    got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return [t for t, _ in got], Counter(v for _, v in got)


def scores(
    result: dict[str, Any],
    eval_p: Sequence[Any] | None,
    answers: dict[str, list[str]],
    figures: dict[str, Any],
) -> None:
    """Accuracy, gain, length and formatting of the held-out answers into `result`, and the
    figures the targets need into `figures`, each as soon as it is known (a helper that fails
    leaves those before it); nothing unless both versions answered."""
    if eval_p is None or "before" not in answers or "after" not in answers:
        return
    result["sample_answers"] = [
        {"prompt": p.prompt, **{k: v[i] for k, v in answers.items()}}
        for i, p in enumerate(eval_p[:6])
    ]
    acc = {k: accuracy(eval_p, v) for k, v in answers.items()}
    gain = paired_gain(acc["before"], acc["after"])
    result["heldout_accuracy"] = {k: v.to_json() for k, v in acc.items()}
    result["paired_gain"] = gain.to_json()
    figures["gain_points"] = gain.points
    result["per_instruction"] = {k: per_instruction_accuracy(eval_p, v) for k, v in answers.items()}

    words: dict[str, dict[str, float]] = {}
    for k, ans in answers.items():
        w = answer_words(ans)
        words[k] = {"mean": float(w["mean"]), "share_under_8": float(w["share_under_8"])}
    result["answer_words"] = words
    figures["words_mean_before"] = words["before"]["mean"]
    figures["words_mean_after"] = words["after"]["mean"]
    figures["share_under_8_after"] = words["after"]["share_under_8"]

    # Rate: among held-out prompts that ask for no formatting, the share of answers with some;
    # by feature: among prompts that did not ask for that feature, the share showing it.
    fmt = {
        k: {
            "rate": float(unrequested_formatting_rate(eval_p, ans)),
            "by_feature": unrequested_formatting_by_feature(eval_p, ans),
        }
        for k, ans in answers.items()
    }
    result["unrequested_formatting"] = fmt
    figures["formatting_rate_before"] = fmt["before"]["rate"]
    figures["formatting_rate_after"] = fmt["after"]["rate"]
