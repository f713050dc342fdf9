"""The steps of one cycle: snapshot -> reward model -> PPO-ptx -> evaluate -> gate -> promote.

Each step is a plain function of a `StepContext` that returns its output (a JSON dict) in a
`StepResult`; runner.py makes it idempotent, fenced and cancellable. The heavy steps run their
stage in a subprocess (supervise.py); every other component is reached through stages.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from instructloop.training.loop import stages
from instructloop.training.loop.config import STEP_NICENESS, CycleConfig, is_number
from instructloop.training.loop.heartbeat import Heartbeat
from instructloop.training.loop.locks import Holder, LockLost
from instructloop.training.loop.store import RANKING_KINDS, CycleError, CycleStore
from instructloop.training.loop.supervise import HeavyRun, run_heavy
from instructloop.training.recipes import recipe


@dataclass
class StepContext:
    """What a step function gets."""

    cycle_id: str
    step: str
    config: CycleConfig
    redis_url: str
    prefix: str
    store: CycleStore
    holder: Holder
    dir: Path
    """This step's own directory (emptied before each execution)."""
    outputs: dict[str, dict[str, Any]]
    """Earlier steps' outputs."""
    heartbeat: Heartbeat
    step_time_limit_s: float
    niceness: int = STEP_NICENESS
    """CPU niceness of the heavy step's subprocess (LoopConfig.step_niceness)."""
    yield_to_serving: bool = True
    """Pause the heavy step while serving is busy (LoopConfig.yield_to_serving)."""

    def check(self) -> None:
        """Raise if the cycle was cancelled or its lock lost (call between pieces of work)."""
        self.heartbeat.check()

    def publish_progress(self, progress: dict[str, Any]) -> None:
        """Copy a heavy step's progress into its record while it runs."""
        with contextlib.suppress(redis.RedisError):
            state = self.store.step_state(self.cycle_id, self.step)
            if state.get("state") == "running":
                self.store.set_step_state(self.cycle_id, self.step, {**state, "progress": progress})


@dataclass
class StepResult:
    output: dict[str, Any]
    """Stored as the step's output (JSON)."""
    writes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Other hashes to set in the same fenced write, e.g. the last reward model pointer."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Figures for the step record and the metrics."""


def _heavy(ctx: StepContext, func: str, **kwargs: Any) -> dict[str, Any]:
    """Run `stages.<func>` in the step's subprocess, stopped by the step's heartbeat."""
    run = HeavyRun(
        step=ctx.step,
        dir=ctx.dir,
        launcher=ctx.config.launcher,
        niceness=ctx.niceness,
        time_limit_s=ctx.step_time_limit_s,
        memory_need_gib=ctx.config.step_memory_need(ctx.step),
        check=ctx.check,
        publish=ctx.publish_progress,
        yield_to_serving=ctx.yield_to_serving,
    )
    return run_heavy(run, func, **kwargs)


RECORDED_USERS = 100
"""Users listed by name in a cycle record (most data first); the manifest has them all."""


def _sources_for_record(sources: dict[str, Any]) -> dict[str, Any]:
    """Who supplied the snapshot's preferences, for the cycle record: the caps, what they
    dropped, and per user (the largest first) kept and dropped counts and agreement with the
    majority of the other users."""
    users = sources["users"]
    top = sorted(users, key=lambda u: -(users[u]["kept"] + users[u]["dropped"]))
    return {
        "caps": sources["caps"],
        "users_total": len(users),
        "dropped": sum(u["dropped"] for u in users.values()),
        "users": {u: users[u] for u in top[:RECORDED_USERS]},
    }


def step_snapshot(ctx: StepContext) -> StepResult:
    """1. A consistent export of the feedback, recording the feedback ids it holds; and the
    version serving now, which this cycle trains from and compares against."""
    live = stages.live_model(ctx.redis_url, ctx.prefix)
    if live is None:
        raise CycleError("no live model in the registry: register and promote one first")
    baseline = ctx.store.feedback_count()  # read before the export: never overcounts
    manifest = stages.export_snapshot(
        ctx.redis_url, ctx.prefix, ctx.dir / "export", ctx.config.source_caps()
    )
    n = sum(int(manifest["counts"].get(k, 0)) for k in RANKING_KINDS)
    if n < ctx.config.min_feedback:
        raise CycleError(
            f"not enough feedback: {n} rankings/comparisons in the snapshot, "
            f"min_feedback is {ctx.config.min_feedback}"
        )
    out = {
        "dir": str(ctx.dir / "export"),
        "snapshot_id": manifest["snapshot_id"],
        "feedback_ids": len(manifest["feedback_ids"]),
        "counts": manifest["counts"],
        "sources": _sources_for_record(manifest["sources"]),
        "feedback_count": baseline,
        "parent_version": live["version"],
        "parent_path": live["path"],
    }
    summary = {"feedback": n, "parent": live["version"]}
    summary["dropped_by_source_cap"] = out["sources"]["dropped"]
    return StepResult(out, summary=summary)


def step_reward_model(ctx: StepContext) -> StepResult:
    """2. Retrain the reward model on the snapshot, warm-started from the last one."""
    snap = ctx.outputs["snapshot"]
    last = ctx.store.last_reward_model()
    init = last.get("path") or ctx.config.initial_reward_model or snap["parent_path"]
    res = _heavy(
        ctx,
        "train_reward_model",
        snapshot_dir=snap["dir"],
        out_dir=str(ctx.dir / "model"),
        init_from=init,
        parent_version=snap["parent_version"],
        snapshot_id=snap["snapshot_id"],
        overrides={**recipe(ctx.config.recipe).reward_model_overrides(), **ctx.config.reward_model},
    )
    out = {"path": res["path"], "init_from": init, "metrics": res.get("metrics", {})}
    pointer = {
        "path": res["path"],
        "cycle_id": ctx.cycle_id,
        "snapshot_id": snap["snapshot_id"],
        "feedback_count": snap["feedback_count"],
        "trained_at": time.time(),
    }
    return StepResult(out, writes={ctx.store.keys.reward_model: pointer}, summary=out["metrics"])


def step_ppo(ctx: StepContext) -> StepResult:
    """3. PPO-ptx from the policy serving now (also the KL reference), rewarded by the new RM."""
    snap = ctx.outputs["snapshot"]
    rm = ctx.outputs["reward_model"]
    res = _heavy(
        ctx,
        "train_ppo",
        policy=snap["parent_path"],
        reward_model=rm["path"],
        snapshot_dir=snap["dir"],
        out_dir=str(ctx.dir / "model"),
        parent_version=snap["parent_version"],
        snapshot_id=snap["snapshot_id"],
        overrides={**recipe(ctx.config.recipe).ppo_overrides(), **ctx.config.ppo},
    )
    out = {"path": res["path"], "metrics": res.get("metrics", {})}
    return StepResult(out, summary=out["metrics"])


def step_evaluate(ctx: StepContext) -> StepResult:
    """4. Candidate against the serving policy: win rates (new RM, second judge), ptx LM loss,
    constraint accuracy."""
    snap = ctx.outputs["snapshot"]
    res = _heavy(
        ctx,
        "evaluate",
        candidate=ctx.outputs["ppo"]["path"],
        serving=snap["parent_path"],
        reward_model=ctx.outputs["reward_model"]["path"],
        snapshot_dir=snap["dir"],
        out_dir=str(ctx.dir / "eval"),
        overrides=ctx.config.evaluate,
    )
    metrics = dict(res["metrics"])
    return StepResult({"metrics": metrics, "report": res.get("report")}, summary=metrics)


def gate_checks(cfg: CycleConfig, m: dict[str, Any]) -> dict[str, bool]:
    """The gate, check by check (every check must pass)."""
    need = (
        "win_rate_rm",
        "win_rate_judge",
        "ptx_loss_candidate",
        "ptx_loss_serving",
        "constraint_accuracy_candidate",
        "constraint_accuracy_serving",
    )
    missing = [k for k in need if k not in m]
    if missing:
        raise CycleError(f"evaluation is missing {', '.join(missing)}")
    ptx_increase = float(m["ptx_loss_candidate"]) - float(m["ptx_loss_serving"])
    drop = float(m["constraint_accuracy_serving"]) - float(m["constraint_accuracy_candidate"])
    return {
        "win_rate_rm": float(m["win_rate_rm"]) >= cfg.gate_min_win_rate_rm,
        "win_rate_judge": float(m["win_rate_judge"]) >= cfg.gate_min_win_rate_judge,
        "ptx_loss": ptx_increase <= cfg.gate_max_ptx_loss_increase,
        "constraint_accuracy": drop <= cfg.gate_max_constraint_accuracy_drop,
    }


def step_gate(ctx: StepContext) -> StepResult:
    """5a. Apply the gate and register the candidate with its lineage (parent, data snapshot,
    metrics, gate result), passed or not: a failed candidate stays inspectable."""
    snap = ctx.outputs["snapshot"]
    metrics = dict(ctx.outputs["evaluate"]["metrics"])
    checks = gate_checks(ctx.config, metrics)
    passed = all(checks.values())
    lineage_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    rm_m = ctx.outputs["reward_model"].get("metrics", {})
    ppo_m = ctx.outputs["ppo"].get("metrics", {})
    lineage_metrics.update({f"rm_{k}": float(v) for k, v in rm_m.items() if is_number(v)})
    lineage_metrics.update({f"ppo_{k}": float(v) for k, v in ppo_m.items() if is_number(v)})
    ctx.check()  # a cancelled or fenced-out cycle registers nothing
    version = stages.register_candidate(
        ctx.redis_url,
        ctx.prefix,
        path=ctx.outputs["ppo"]["path"],
        parent=snap["parent_version"],
        data_snapshot=snap["snapshot_id"],
        metrics=lineage_metrics,
        gate="passed" if passed else "failed",
    )
    out = {"passed": passed, "checks": checks, "version": version}
    return StepResult(out, summary={"passed": passed, **checks})


def step_promote(ctx: StepContext) -> StepResult:
    """5b. Make the candidate live if the gate passed (the registry notifies the servers)."""
    gate = ctx.outputs["gate"]
    parent = ctx.outputs["snapshot"]["parent_version"]
    if not gate["passed"]:
        return StepResult({"promoted": False, "version": gate["version"]})
    live = stages.live_model(ctx.redis_url, ctx.prefix)
    live_version = live["version"] if live else None
    if live_version == gate["version"]:  # promoted by an earlier attempt that then crashed
        return StepResult({"promoted": True, "version": gate["version"]})
    if ctx.config.require_parent_live and live_version != parent:
        raise CycleError(
            f"live version changed during the cycle ({parent} -> {live_version}); "
            "not promoting a candidate evaluated against another version"
        )
    # The fencing check right before the registry write: a cycle whose lock was taken over
    # (or that was cancelled) stops here.
    ctx.check()
    if not ctx.store.lock.renew(ctx.holder):
        raise LockLost(f"cycle {ctx.cycle_id} lost the cycle lock")
    stages.promote(ctx.redis_url, ctx.prefix, gate["version"])
    return StepResult({"promoted": True, "version": gate["version"]})


STEP_FUNCS: dict[str, Callable[[StepContext], StepResult]] = {
    "snapshot": step_snapshot,
    "reward_model": step_reward_model,
    "ppo": step_ppo,
    "evaluate": step_evaluate,
    "gate": step_gate,
    "promote": step_promote,
}
