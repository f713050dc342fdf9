"""The evaluation after training: each policy's greedy answers to the held-out prompts, their
accuracy and paired gain over the SFT policy, the alignment tax (ptx LM loss), and the same along
the run for the step checkpoints."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, progress_log
from benchmarks.learning.config import LearningConfig
from benchmarks.learning.state import RunState
from instructloop.training.checkpoint import CheckpointError, read_checkpoint
from instructloop.training.data.constraints import (
    ConstraintPrompt,
    IFEvalAccuracy,
    accuracy,
    paired_gain,
)
from instructloop.training.data.simulated_users import answer_words
from instructloop.training.evaluate import generate_answers, model_lm_loss, read_texts

PTX_HELDOUT = REPO / "training" / "data" / "files" / "ptx_heldout.jsonl"

_log = progress_log("learning")


@dataclasses.dataclass
class Evaluation:
    """The held-out answers and their scores per policy ("before" is the SFT policy), and the
    ptx LM loss per policy ("sft" for the SFT policy)."""

    before: IFEvalAccuracy
    answers: dict[str, list[str]]
    after: dict[str, IFEvalAccuracy]
    loss: dict[str, Any]
    gains: dict[str, dict[str, Any]]
    texts: list[str]

    def rise_of(self, nll: float) -> float:
        """The alignment tax: the relative rise of held-out ptx LM loss over the SFT policy's."""
        return (nll - self.loss["sft"].nll) / self.loss["sft"].nll


def evaluate(
    cfg: LearningConfig,
    st: RunState,
    sft: str,
    runs: dict[str, Any],
    eval_p: list[ConstraintPrompt],
    before: IFEvalAccuracy,
    before_answers: list[str],
    t0: float,
) -> Evaluation:
    """Held-out answers (greedy) and the alignment tax, per policy."""
    texts = read_texts(PTX_HELDOUT)
    t = time.time()
    loss = {"sft": model_lm_loss(sft, texts, device="cpu")}
    st.phases["eval_sft_lm_loss_s"] = time.time() - t
    after: dict[str, IFEvalAccuracy] = {}
    answers: dict[str, list[str]] = {"before": before_answers}
    for name, ck in runs.items():
        t = time.time()
        answers[name] = generate_answers(ck.path, eval_p, max_tokens=cfg.eval_max_tokens)
        after[name] = accuracy(eval_p, answers[name])
        loss[name] = model_lm_loss(ck.path, texts, device="cpu")
        st.phases[f"eval_{name}_s"] = time.time() - t
        _log(
            t0,
            f"{name}: prompt-level {after[name].prompt_level:.3f}, "
            f"ptx LM loss {loss[name].nll:.4f} (SFT {loss['sft'].nll:.4f})",
        )
    # The same prompts before and after: the paired standard error of the gain, and how
    # many prompts each policy gained or lost against the SFT policy.
    gains = {k: paired_gain(before, v).to_json() for k, v in after.items()}
    return Evaluation(before, answers, after, loss, gains, texts)


def words(answers: list[str]) -> dict[str, float]:
    """Mean answer words and the share under 8 words (simulated_users.answer_words)."""
    w = answer_words(answers)
    return {"mean": w["mean"], "share_under_8": w["share_under_8"]}


def checkpoint_curve(
    cfg: LearningConfig,
    runs: dict[str, Any],
    eval_p: list[ConstraintPrompt],
    ev: Evaluation,
    t0: float,
) -> dict[str, list[dict[str, Any]]]:
    """Along each run: the saved step checkpoints, scored like the final ones (not in the
    recipe's time: a way to choose the number of steps, not part of it)."""
    curve: dict[str, list[dict[str, Any]]] = {}
    for name in runs:
        for step, path in _step_checkpoints(runs[name]):
            t = time.time()
            ans = generate_answers(path, eval_p, max_tokens=cfg.eval_max_tokens)
            acc = accuracy(eval_p, ans)
            gain = paired_gain(ev.before, acc).to_json()
            nll = model_lm_loss(path, ev.texts, device="cpu").nll
            curve.setdefault(name, []).append(
                _point(ev, step, acc, gain, ans, nll, eval_seconds=time.time() - t)
            )
            _log(t0, f"{name} step {step}: prompt-level {acc.prompt_level:.3f}")
        if name in curve:
            steps = runs[name].metrics.get("steps")
            curve[name].append(
                _point(ev, steps, ev.after[name], ev.gains[name], ev.answers[name],
                       ev.loss[name].nll)
            )  # fmt: skip
    return curve


def _point(
    ev: Evaluation, step: Any, acc: Any, gain: Any, ans: list[str], nll: float, **extra: Any
) -> dict[str, Any]:
    return {
        "step": step,
        "prompt_level": acc.prompt_level,
        "instruction_level": acc.instruction_level,
        "paired_gain": gain,
        "answer_words": words(ans),
        # The alignment tax along the run too: the step to choose must keep it.
        "ptx_lm_loss": nll,
        "ptx_lm_loss_rise": ev.rise_of(nll),
        **extra,
    }


def _step_checkpoints(final: Any) -> list[tuple[int, Path]]:
    """The `<final>.stepN` checkpoints PPO's save_every wrote on the way to `final` (a
    CheckpointInfo), by step; those of an earlier run in the same work dir, with another
    config, are left out."""
    config, base = final.manifest.get("config"), final.path
    found = []
    for p in base.parent.glob(f"{base.name}.step*"):
        suffix = p.name.removeprefix(f"{base.name}.step")
        try:
            same_run = suffix.isdigit() and read_checkpoint(p).manifest.get("config") == config
        except CheckpointError:
            continue
        if same_run:
            found.append((int(suffix), p))
    return sorted(found)
