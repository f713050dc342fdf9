"""One learning run, step by step: prompts, the SFT policy's samples and their rankings, the
reward model, PPO-ptx (and plain PPO), the evaluation after, and the result."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, progress_log, torch_machine
from benchmarks.learning.config import LearningConfig
from benchmarks.learning.evaluation import Evaluation, checkpoint_curve, evaluate, words
from benchmarks.learning.state import RunState, plain
from instructloop.training.config import PPOConfig, RewardModelConfig, config_from_dict
from instructloop.training.data.constraints import (
    ConstraintPrompt,
    accuracy,
    generate_prompts,
    score,
)
from instructloop.training.data.demonstrations import demonstration_row, pick_demonstration
from instructloop.training.data.generation import Completion, Sampler
from instructloop.training.data.simulated_labeler import rank, write_export
from instructloop.training.evaluate import read_texts
from instructloop.training.models import resolve_model_path
from instructloop.training.recipes import recipe

PTX_TRAIN = REPO / "training" / "data" / "files" / "ptx_train.jsonl"

_log = progress_log("learning")


def run(cfg: LearningConfig) -> dict[str, Any]:
    """Steps 1-5 of the benchmark (see the package docstring); reads as the steps in order."""
    t0 = time.time()
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="instructloop-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    sft = resolve_model_path(cfg.model)
    _log(t0, f"work dir {work}; SFT policy {sft}")
    train_p, eval_p, val_p = _prompts(cfg)

    st = RunState(work, _sampling_settings(cfg, sft), resume=cfg.resume, t0=t0)
    before_answers, outs = _samples(cfg, st, sft, eval_p, train_p + val_p, t0)
    before = accuracy(eval_p, before_answers)
    _log(
        t0,
        f"before: prompt-level {before.prompt_level:.3f}, "
        f"instruction-level {before.instruction_level:.3f}",
    )
    ptx_rows = [{"text": x} for x in read_texts(PTX_TRAIN)]
    train_dir = _export(work / "export-train", train_p, outs[: len(train_p)], ptx_rows, t0)
    val_dir = _export(work / "export-val", val_p, outs[len(train_p) :], ptx_rows, t0)
    # Share of constraints the sampled answers meet (the raw material the RM learns from).
    sample_scores = [score(p, c.text) for p, cs in zip(train_p, outs, strict=False) for c in cs]

    rm = _reward_model(cfg, st, work, sft, train_dir, val_dir, t0)
    runs = _ppo_runs(cfg, st, work, sft, rm, train_dir, t0)
    ev = evaluate(cfg, st, sft, runs, eval_p, before, before_answers, t0)
    curve = checkpoint_curve(cfg, runs, eval_p, ev, t0) if cfg.eval_steps else {}
    return _result(cfg, work, st, eval_p, rm, runs, ev, curve, sample_scores, t0)


def _prompts(
    cfg: LearningConfig,
) -> tuple[list[ConstraintPrompt], list[ConstraintPrompt], list[ConstraintPrompt]]:
    """Training prompts, held-out evaluation prompts, and held-out RM validation prompts (none
    of them an evaluation prompt)."""
    train_p = generate_prompts(cfg.n_train_prompts, "train", seed=cfg.seed)
    eval_p = generate_prompts(cfg.n_eval_prompts, "heldout", seed=cfg.seed)
    eval_ids = {p.id for p in eval_p}
    val_p = [
        p
        for p in generate_prompts(
            cfg.n_rm_val_prompts + cfg.n_eval_prompts, "heldout", seed=cfg.seed + 1
        )
        if p.id not in eval_ids
    ][: cfg.n_rm_val_prompts]
    return train_p, eval_p, val_p


def _sampling_settings(cfg: LearningConfig, sft: str) -> Any:
    """What the samples depend on (a rerun with other values samples again)."""
    return plain({
        "model": sft,
        **{k: getattr(cfg, k) for k in (
            "seed", "n_train_prompts", "n_rm_val_prompts", "n_eval_prompts", "k",
            "sample_max_tokens", "eval_max_tokens",
        )},
    })  # fmt: skip


def _samples(
    cfg: LearningConfig,
    st: RunState,
    sft: str,
    eval_p: list[ConstraintPrompt],
    ranked_p: list[ConstraintPrompt],
    t0: float,
) -> tuple[list[str], list[list[Any]]]:
    """The SFT policy's greedy answers to the held-out prompts and its K samples per prompt to
    rank: from state.json when a previous run made them."""
    if "samples" in st.state:
        _log(t0, "resuming: samples from the previous run")
        st.phases.update(st.state["phases"])
        outs = [[Completion(**c) for c in cs] for cs in st.state["samples"]]
        return st.state["before_answers"], outs
    t = time.time()
    with Sampler(sft) as s:
        _log(t0, f"engine up ({time.time() - t:.0f}s); greedy answers to {len(eval_p)} held-out")
        before = s.sample(
            [p.prompt for p in eval_p], n=1, temperature=0.0, max_tokens=cfg.eval_max_tokens
        )
        _log(t0, f"sampling K={cfg.k} for {len(ranked_p)} prompts")
        outs = s.sample_full(
            [p.prompt for p in ranked_p],
            n=cfg.k,
            temperature=1.0,
            max_tokens=cfg.sample_max_tokens,
        )
    before_answers = [o[0] for o in before]
    st.phases["sample_s"] = time.time() - t
    st.save(
        before_answers=before_answers,
        samples=[[dataclasses.asdict(c) for c in cs] for cs in outs],
        phases=st.phases,
    )
    return before_answers, outs


def _export(
    out: Path,
    prompts: list[ConstraintPrompt],
    completions: list[Any],
    ptx_rows: list[dict[str, Any]],
    t0: float,
) -> Path:
    """The simulated labeller's rankings, with demonstrations, in the service's export format."""
    rankings, demos = [], []
    for p, cs in zip(prompts, completions, strict=True):
        rankings.append((rank(p, [c.text for c in cs]), cs[0].prompt_text))
        d = pick_demonstration(p, cs)
        if d is not None:
            demos.append(demonstration_row(p, d))
    prompt_rows = [
        {"prompt": p.prompt, "prompt_text": cs[0].prompt_text}
        for p, cs in zip(prompts, completions, strict=True)
    ]
    s = write_export(
        out,
        rankings,
        model_version="sft",
        sft_rows=demos,
        ptx_rows=ptx_rows,
        prompt_rows=prompt_rows,
    )
    _log(t0, f"{out.name}: {s.counts} (all-tied groups dropped: {s.all_tied_dropped})")
    return out


def _reward_model(
    cfg: LearningConfig,
    st: RunState,
    work: Path,
    sft: str,
    train_dir: Path,
    val_dir: Path,
    t0: float,
) -> Any:
    """The reward model on the training rankings, validated on the held-out ones."""
    from instructloop.training.reward_model import run_reward_model  # torch: only here

    t = time.time()
    n_demos = len((train_dir / "sft.jsonl").read_text().splitlines())
    rm_cfg = config_from_dict(
        RewardModelConfig,
        {
            "model_path": sft,
            "train_path": str(train_dir / "rankings.jsonl"),
            "val_path": str(val_dir / "rankings.jsonl"),
            # Demonstrations score 0 on average (paper); none passed: the RM's own default.
            "reference_path": str(train_dir / "sft.jsonl") if n_demos else None,
            "output_dir": str(work / "rm"),
            "overwrite": True,
            "seed": cfg.seed,
            "progress": False,
            **recipe(cfg.recipe).reward_model_overrides(),
            **cfg.rm,
        },
    )
    rm = st.reuse("rm", rm_cfg, work)
    if rm is None:
        _log(t0, "training the reward model")
        rm = run_reward_model(rm_cfg)
        st.finished("rm", rm_cfg, t)
    _log(t0, f"RM: {rm.metrics}")
    return rm


def _ppo_runs(
    cfg: LearningConfig,
    st: RunState,
    work: Path,
    sft: str,
    rm: Any,
    train_dir: Path,
    t0: float,
) -> dict[str, Any]:
    """PPO-ptx, and plain PPO (γ_ptx = 0) unless turned off: same seed and settings otherwise."""
    from instructloop.training.ppo import run_ppo  # torch: only here

    runs: dict[str, Any] = {}
    ppo_overrides = {**recipe(cfg.recipe).ppo_overrides(), **cfg.ppo}
    variants = [("ppo_ptx", ppo_overrides.get("gamma_ptx", 1.0))]
    if cfg.plain_ppo:
        variants.append(("ppo", 0.0))
    for name, gamma_ptx in variants:
        t = time.time()
        ppo_cfg = config_from_dict(
            PPOConfig,
            {
                # ppo={"seed": N} varies PPO alone (rollouts, minibatch order), the data kept.
                "seed": cfg.seed,
                **ppo_overrides,
                "gamma_ptx": gamma_ptx,
                "policy_path": sft,
                "reward_model_path": str(rm.path),
                "prompts_path": str(train_dir / "prompts.jsonl"),
                "ptx_path": str(train_dir / "ptx.jsonl"),
                "max_new_tokens": cfg.sample_max_tokens,
                "output_dir": str(work / name),
                "overwrite": True,
                "progress": False,
            },
        )
        ck = st.reuse(name, ppo_cfg, work)
        if ck is None:
            _log(t0, f"{name}: PPO with gamma_ptx={gamma_ptx}")
            ck = run_ppo(ppo_cfg)
            st.finished(name, ppo_cfg, t)
        runs[name] = ck
        _log(t0, f"{name}: {ck.metrics}")
    return runs


def _result(
    cfg: LearningConfig,
    work: Path,
    st: RunState,
    eval_p: list[ConstraintPrompt],
    rm: Any,
    runs: dict[str, Any],
    ev: Evaluation,
    curve: dict[str, list[dict[str, Any]]],
    sample_scores: list[tuple[int, int]],
    t0: float,
) -> dict[str, Any]:
    """The result file's contents: figures, the raw material behind them, and the targets."""
    phases = st.phases
    # The recipe (issue 3: SFT policy -> RM -> PPO-ptx, evaluated) is what the 60 minutes are
    # for; plain PPO is a comparison run for the alignment tax. A resumed run counts the time
    # of the work, not of waiting.
    recipe_phases = ("sample_s", "rm_s", "ppo_ptx_s", "eval_sft_lm_loss_s", "eval_ppo_ptx_s")
    recipe_total = sum(phases.get(k, 0.0) for k in recipe_phases)
    gain_points = ev.gains["ppo_ptx"]["points"]
    rise = {k: ev.rise_of(v.nll) for k, v in ev.loss.items() if k != "sft"}
    return {
        "benchmark": "learning",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": torch_machine(load_average_at_end=os.getloadavg()),
        "config": dataclasses.asdict(cfg),
        "work_dir": str(work),
        "heldout_accuracy": {
            "before": ev.before.to_json(),
            **{k: v.to_json() for k, v in ev.after.items()},
        },
        "prompt_level_gain_points": gain_points,
        "paired_gain": ev.gains,
        # Degeneration shows here first (answers shrinking to a title or a P.S. meet many
        # checkers): mean words, and the share of answers under 8 words.
        "answer_words": {k: words(v) for k, v in ev.answers.items()},
        "sample_answers": [
            {"prompt": p.prompt, **{k: v[i] for k, v in ev.answers.items()}}
            for i, p in enumerate(eval_p[:8])
        ],
        "reward_model": rm.metrics,
        "checkpoint_curve": curve,
        "ppo_metrics": {k: v.metrics for k, v in runs.items()},
        "ptx_lm_loss": {k: v.to_json() for k, v in ev.loss.items()},
        "ptx_lm_loss_rise": rise,
        "sampled_instruction_rate": sum(m for m, _ in sample_scores)
        / max(1, sum(n for _, n in sample_scores)),
        # total = the phases' sum (equal to the wall time unless the run was resumed).
        "seconds": {
            **phases,
            "recipe_total": recipe_total,
            "total": sum(phases.values()),
            "wall_this_invocation": time.time() - t0,
        },
        "targets": {
            "prompt_level_gain_points>=10": gain_points >= 10,
            "ppo_ptx_lm_loss_rise<=2%": rise["ppo_ptx"] <= 0.02,
            "recipe_minutes<=60": recipe_total <= 3600,
        },
    }
