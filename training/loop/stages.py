"""The one module through which the loop reaches the other components.

Feedback export, the model registry, the training stages and the evaluation are written by
their own modules; the loop reaches them only through these functions, which take and return
plain JSON values (the heavy ones run in the step's subprocess, supervise.py). If one of those
APIs changes, this file is the one to fix; tests/test_layers.py keeps every other loop module
off the stages.

Returned figures use fixed names the gate and the metrics rely on:
- reward model: "accuracy" (held-out pairwise accuracy), plus whatever the stage reports;
- PPO: "reward" (mean score of the last rollouts), "kl" (mean KL to the reference);
- evaluation: "win_rate_rm", "win_rate_judge", "ptx_loss_candidate", "ptx_loss_serving",
  "constraint_accuracy_candidate", "constraint_accuracy_serving".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.export import export_snapshot as _export
from instructloop.feedback.poisoning import SourceCaps
from instructloop.registry import ModelRegistry, UnknownVersion
from instructloop.training.checkpoint import CheckpointError, read_checkpoint
from instructloop.training.config import PPOConfig, RewardModelConfig, config_from_dict

# The stage entry points (reward_model, ppo, evaluate) load torch and transformers: they are
# imported inside the functions below, which run only in a heavy step's subprocess.


def _registry(redis_url: str, prefix: str) -> ModelRegistry:
    return ModelRegistry(redis_url, prefix=prefix)


# --- registry -----------------------------------------------------------------------------------


def live_model(redis_url: str, prefix: str) -> dict[str, str] | None:
    """{"version", "path"} of the live version, or None."""
    reg = _registry(redis_url, prefix)
    try:
        mv = reg.live()
        return {"version": mv.version, "path": mv.path} if mv else None
    finally:
        reg.close()


def register_candidate(
    redis_url: str,
    prefix: str,
    *,
    path: str,
    parent: str,
    data_snapshot: str,
    metrics: dict[str, float],
    gate: str,
) -> str:
    """Register a PPO candidate with its lineage; its version. Registering the same directory
    again (a step redone after a crash) returns the version it already has. The registry
    verifies it like any checkpoint ("static", instructloop/registry/verify.py; it must lie under
    the checkpoint roots, which the default work_dir in the data directory does): a candidate
    that does not verify fails the gate step and is never registered."""
    reg = _registry(redis_url, prefix)
    try:
        clean = {k: v for k, v in metrics.items() if math.isfinite(v)}
        mv = reg.register(
            path,
            source="ppo",
            parent=parent,
            data_snapshot=data_snapshot,
            metrics=clean,
            gate=gate,
        )
        return str(mv.version)
    finally:
        reg.close()


def promote(redis_url: str, prefix: str, version: str) -> None:
    """Make `version` live; the registry announces it to the servers."""
    reg = _registry(redis_url, prefix)
    try:
        reg.promote(version)
    finally:
        reg.close()


def register_checkpoint(
    redis_url: str, prefix: str, path: str, source: str = "register", verify: str = "static"
) -> str:
    """`instructloop model register PATH`: add an existing checkpoint directory, verified as
    `verify` says ("static" or "load", instructloop/registry/verify.py); its version. Lineage
    (parent, data snapshot, metrics) comes from the checkpoint's manifest.json when it has
    one."""
    parent = data_snapshot = None
    metrics: dict[str, float] = {}
    try:
        info = read_checkpoint(path)
        data_snapshot = info.manifest.get("data_snapshot")
        parent = info.manifest.get("parent_version")
        metrics = {
            k: float(v)
            for k, v in info.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
    except CheckpointError:
        pass  # a plain HF directory: no lineage to read
    reg = _registry(redis_url, prefix)
    try:
        if parent is not None:
            try:
                reg.get(parent)
            except UnknownVersion:
                parent = None  # trained from a version this registry does not know
        mv = reg.register(
            path, source=source, parent=parent, data_snapshot=data_snapshot, metrics=metrics,
            verify=verify,
        )  # fmt: skip
        return str(mv.version)
    finally:
        reg.close()


# --- feedback -----------------------------------------------------------------------------------


def export_snapshot(
    redis_url: str, prefix: str, out_dir: str | Path, caps: SourceCaps | None = None
) -> dict[str, Any]:
    """A consistent export of all feedback so far (feedback/export.py), each source held to
    its share of the preference data (feedback/poisoning.py)."""
    m = _export(redis_url, Path(out_dir), config=StoreConfig(key_prefix=prefix), caps=caps)
    return {
        "snapshot_id": m.snapshot_id,
        "feedback_ids": list(m.feedback_ids),
        "counts": dict(m.counts),
        "files": dict(m.files),
        "sources": m.sources,
    }


# --- heavy steps (run in the step subprocess) ---------------------------------------------------


def _stage_config(cls: type, overrides: dict[str, Any], fixed: dict[str, Any]) -> Any:
    clash = sorted(set(overrides) & set(fixed))
    if clash:
        raise ValueError(f"the cycle sets {', '.join(clash)} itself; remove them from the config")
    return config_from_dict(cls, {**overrides, **fixed})


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def train_reward_model(
    *,
    snapshot_dir: str,
    out_dir: str,
    init_from: str,
    parent_version: str,
    snapshot_id: str,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    cfg = _stage_config(
        RewardModelConfig,
        overrides,
        {
            "model_path": init_from,
            "train_path": str(Path(snapshot_dir) / "rankings.jsonl"),
            "output_dir": out_dir,
            "overwrite": True,  # a redone step replaces its interrupted attempt
            "parent_version": parent_version,
            "data_snapshot": snapshot_id,
            "progress": False,
        },
    )
    from instructloop.training.reward_model import run_reward_model

    info = run_reward_model(cfg)
    metrics = _numbers(info.metrics)
    if "val_accuracy" in metrics:
        metrics["accuracy"] = metrics["val_accuracy"]
    return {"path": str(info.path), "metrics": metrics}


def train_ppo(
    *,
    policy: str,
    reward_model: str,
    snapshot_dir: str,
    out_dir: str,
    parent_version: str,
    snapshot_id: str,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    snap = Path(snapshot_dir)
    fixed: dict[str, Any] = {
        "policy_path": policy,
        "reference_path": policy,  # the KL anchor is the policy serving now
        "reward_model_path": reward_model,
        "prompts_path": str(snap / "prompts.jsonl"),
        "output_dir": out_dir,
        "overwrite": True,
        "parent_version": parent_version,
        "data_snapshot": snapshot_id,
        "progress": False,
    }
    if "ptx_path" not in overrides:
        fixed["ptx_path"] = str(snap / "ptx.jsonl")
    cfg = _stage_config(PPOConfig, overrides, fixed)  # a bad override fails before any import
    from instructloop.training.ppo import run_ppo

    info = run_ppo(cfg)
    metrics = _numbers(info.metrics)
    for name, candidates in (("reward", ("reward", "reward_mean", "score")), ("kl", ("kl",))):
        for c in candidates:
            if c in metrics:
                metrics.setdefault(name, metrics[c])
                break
    return {"path": str(info.path), "metrics": metrics}


def evaluate(
    *,
    candidate: str,
    serving: str,
    reward_model: str,
    snapshot_dir: str,
    out_dir: str,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """training/evaluate.py on held-out constraint prompts and the held-out ptx corpus (not the
    snapshot's, which PPO-ptx trained on). The second judge is the constraint judge: it checks
    IFEval's instructions programmatically, so it cannot be gamed through the reward model."""
    from instructloop.training.evaluate import EvalConfig
    from instructloop.training.evaluate import evaluate as run_eval

    fixed = {"policy": candidate, "baseline": serving, "reward_model": reward_model}
    clash = sorted(set(overrides) & set(fixed))
    if clash:
        raise ValueError(f"the cycle sets {', '.join(clash)} itself; remove them from the config")
    report = run_eval(EvalConfig(**overrides, **fixed))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=1, default=str))
    pol, base = report["models"]["policy"], report["models"]["baseline"]
    wr = report["win_rate"]
    metrics = {
        "win_rate_rm": wr["reward_model"]["win_rate"],
        "win_rate_rm_stderr": wr["reward_model"]["stderr"],
        "win_rate_judge": wr["constraints"]["win_rate"],
        "win_rate_judge_stderr": wr["constraints"]["stderr"],
        "ptx_loss_candidate": pol["ptx_lm_loss"]["nll"],
        "ptx_loss_serving": base["ptx_lm_loss"]["nll"],
        # instruction level: finer than prompt level, so less noisy on few prompts
        "constraint_accuracy_candidate": pol["ifeval"]["instruction_level"],
        "constraint_accuracy_serving": base["ifeval"]["instruction_level"],
        "prompt_accuracy_candidate": pol["ifeval"]["prompt_level"],
        "prompt_accuracy_serving": base["ifeval"]["prompt_level"],
        "mean_reward_candidate": pol["mean_reward"],
        "mean_reward_serving": base["mean_reward"],
        "eval_prompts": pol["ifeval"]["n_prompts"],
    }
    return {"metrics": _numbers(metrics), "report": str(Path(out_dir) / "report.json")}
