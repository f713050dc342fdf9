"""One lap of the loop: snapshot -> reward model -> PPO-ptx -> evaluate -> gate -> promote.

Each step is a plain function of a `StepContext` that returns its output (a JSON dict).
`run_step` wraps a step with everything that makes the cycle safe to run on Celery:

- Idempotent. A step's output is stored in the cycle record in Redis under the cycle id
  (`out:<step>`); a step whose output is there is not run again (a redelivered message after a
  worker crash skips the finished steps and redoes only the interrupted one). Files go under
  `<work_dir>/<cycle id>/<step>/`, and an interrupted step's partial files are removed first.
- Fenced. The cycle holds the cycle lock with a fencing token (training/locks.py). The output,
  the "last reward model" pointer and the promotion are written only while the token is still
  current, so a stale holder cannot publish anything, promote included.
- Cancellable. `cycle cancel` sets a flag; it is checked before each step, every heartbeat while
  a heavy step runs (the step's subprocess is then stopped) and before a step's result is written.
- Safe on failure. Nothing reaches the registry's live pointer except the promote step, after the
  gate passed; any failure ends the cycle with state "failed", the step and the reason in the
  cycle record, and counts it in the metrics. The serving model is untouched.

Heavy steps (reward model, PPO, evaluation) run in a subprocess (`python -m training.cycle`, or
under `CycleConfig.launcher`, e.g. torchrun for several GPUs): it can be stopped on cancel or
time-out, its memory is returned when it ends, and a crash in native code fails the step
instead of the worker.

Redis keys (prefix `p`, default "il:"), all kept for good unless noted:
| key                        | type   | holds                                                  |
|----------------------------|--------|--------------------------------------------------------|
| `p loop:cycle:<id>`        | hash   | the cycle record: state, trigger, token, times, reason,|
|                            |        | config, `step:<name>` (JSON), `out:<name>` (JSON)      |
| `p loop:cycles`            | zset   | cycle ids by creation time                             |
| `p loop:lock`              | string | `<cycle id>:<token>` while a cycle runs (TTL, renewed) |
| `p loop:fence`             | string | the fencing-token counter (INCR)                       |
| `p loop:cancel:<id>`       | string | cancel requested                                       |
| `p loop:lease:<id>:<step>` | string | one execution of a step at a time (short TTL)          |
| `p loop:rm`                | hash   | the last trained reward model: path, cycle, baseline   |
| `p loop:last_started`      | string | when the last cycle started (the schedule trigger)     |
| `p loop:beat`              | string | the active beat (TTL, renewed)                         |
| `p loop:schedule`          | string | the active beat's triggers (JSON), for `status`        |
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import redis
from instructloop.training.locks import CycleLock, Holder, Lease, LockLost
from instructloop.training.progress import PROGRESS_FILE_ENV
from instructloop.training.recipes import DEFAULT_RECIPE, recipe

from instructloop.memory import available_gib

STEPS: tuple[str, ...] = ("snapshot", "reward_model", "ppo", "evaluate", "gate", "promote")
HEAVY_STEPS = frozenset({"reward_model", "ppo", "evaluate"})
TERMINAL = frozenset({"promoted", "rejected", "failed", "cancelled"})
RANKING_KINDS = ("comparison", "ranking")


STEP_NICENESS = 19
"""Heavy steps run at the lowest CPU priority: a server on the same cores keeps its latency,
and training takes the cycles serving leaves idle."""
OOM_SCORE_ADJ = 1000
"""A heavy step is the kernel OOM killer's first choice (/proc/<pid>/oom_score_adj): if memory
runs out after all, the training step dies (and fails its cycle), never the server."""
NICENESS_ENV = "INSTRUCTLOOP_STEP_NICENESS"


class CycleError(Exception):
    """A cycle step failed; the message is the reason recorded in the cycle record."""


class Cancelled(Exception):
    """The cycle was cancelled while the step ran."""


class LeaseLost(Exception):
    """Another execution took this step over (this one was presumed dead): stop quietly."""


class CycleBusy(Exception):
    """Another cycle holds the lock."""

    def __init__(self, holder: Holder | None) -> None:
        self.holder = holder
        who = f"cycle {holder.cycle_id} (token {holder.token})" if holder else "another cycle"
        super().__init__(f"{who} is running; only one cycle runs at a time")


def _default_work_dir() -> str:
    from instructloop.paths import data_dir

    return str(data_dir() / "cycles")


@dataclass
class CycleConfig:
    """What one cycle does. It is stored in the cycle record when the cycle starts, so every
    step (on whichever worker) runs with the same settings. Load it from JSON with `from_dict`;
    unknown keys are an error."""

    work_dir: str = field(default_factory=_default_work_dir)
    """Where each cycle writes its files (`<work_dir>/<cycle id>/<step>/`). Servers load the
    promoted checkpoint from here, so with several machines it must be shared storage."""

    min_feedback: int = 1
    """A snapshot with fewer rankings + comparisons than this fails the cycle ("not enough
    feedback"): a reward model needs preference data."""

    initial_reward_model: str | None = None
    """Warm start of the first reward model (no earlier one recorded); None: the policy serving
    now (the reward model stage puts a scalar head on it; paper: the RM starts from SFT)."""

    recipe: str = DEFAULT_RECIPE
    """The reward-model and PPO-ptx settings for the model's size (training/recipes.py); the
    default model's by default. `reward_model` and `ppo` below override single fields of it."""

    reward_model: dict[str, Any] = field(default_factory=dict)
    """Overrides of training.config.RewardModelConfig on top of the recipe's (e.g.
    {"lr": 1e-5, "epochs": 1}); paths and lineage are set by the cycle."""

    ppo: dict[str, Any] = field(default_factory=dict)
    """Overrides of training.config.PPOConfig on top of the recipe's (e.g.
    {"total_episodes": 512}); the policy and the KL reference are the version serving now, the
    reward model is this cycle's."""

    step_memory_gib: dict[str, float] = field(default_factory=dict)
    """Free memory (GiB) a heavy step needs before it starts, by step name, on top of the
    recipe's; a step that would not fit is refused with a message instead of pushing the
    machine into the OOM killer. {"ppo": 0} turns the check off for PPO."""

    evaluate: dict[str, Any] = field(default_factory=dict)
    """Overrides of the evaluation (training/evaluate.py), e.g. the number of held-out prompts."""

    launcher: list[str] = field(default_factory=list)
    """Command prefix for the heavy steps, e.g. ["torchrun", "--nproc-per-node=4"] or
    ["accelerate", "launch"]; the cycle appends ["-m", "instructloop.training.cycle", ...].
    Empty: the worker's Python. Rank 0 writes the step's result."""

    gate_min_win_rate_rm: float = 0.5
    """Gate: the candidate's win rate against the serving policy, judged by the new reward
    model, must be at least this (ties count half)."""

    gate_min_win_rate_judge: float = 0.5
    """Gate: the same win rate by the second judge (independent of the reward model, so reward
    hacking on the RM's quirks does not pass)."""

    gate_max_ptx_loss_increase: float = 0.05
    """Gate: LM loss on the ptx corpus (nats/token) may rise at most this much over the serving
    policy's (InstructGPT's alignment tax, which PPO-ptx is there to contain)."""

    gate_max_constraint_accuracy_drop: float = 0.05
    """Gate: the share of verifiable constraints the candidate meets may fall at most this much
    below the serving policy's."""

    require_parent_live: bool = True
    """Promote only if the version the candidate was trained from is still live (an operator
    may have promoted or rolled back meanwhile; the evaluation compared against the parent)."""

    def __post_init__(self) -> None:
        if self.min_feedback < 0:
            raise ValueError("min_feedback must be >= 0")
        for name in ("gate_min_win_rate_rm", "gate_min_win_rate_judge"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("reward_model", "ppo", "evaluate"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be an object of config overrides")
        recipe(self.recipe)  # an unknown name fails here, before any step runs
        bad = sorted(set(self.step_memory_gib) - HEAVY_STEPS)
        if bad:
            raise ValueError(f"step_memory_gib: not heavy steps: {', '.join(bad)}")
        if not all(_num(v) and v >= 0 for v in self.step_memory_gib.values()):
            raise ValueError("step_memory_gib: values must be GiB >= 0")
        if not isinstance(self.launcher, list) or not all(
            isinstance(a, str) for a in self.launcher
        ):
            raise ValueError("launcher must be a list of strings")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CycleConfig:
        if not isinstance(data, dict):
            raise ValueError("a cycle config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown cycle config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path | None) -> CycleConfig:
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read cycle config {path}: {e}") from e
        return cls.from_dict(data)


# --- Redis layout -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoopKeys:
    prefix: str = "il:"

    def cycle(self, cycle_id: str) -> str:
        return f"{self.prefix}loop:cycle:{cycle_id}"

    @property
    def cycles(self) -> str:
        return f"{self.prefix}loop:cycles"

    @property
    def lock(self) -> str:
        return f"{self.prefix}loop:lock"

    @property
    def fence(self) -> str:
        return f"{self.prefix}loop:fence"

    def cancel(self, cycle_id: str) -> str:
        return f"{self.prefix}loop:cancel:{cycle_id}"

    def lease(self, cycle_id: str, step: str) -> str:
        return f"{self.prefix}loop:lease:{cycle_id}:{step}"

    @property
    def reward_model(self) -> str:
        return f"{self.prefix}loop:rm"

    @property
    def last_started(self) -> str:
        return f"{self.prefix}loop:last_started"

    @property
    def beat(self) -> str:
        return f"{self.prefix}loop:beat"

    @property
    def schedule(self) -> str:
        return f"{self.prefix}loop:schedule"


# Sets the cycle's terminal state once: KEYS 1 cycle hash; ARGV field/value pairs.
# Returns 1 if this call ended the cycle, 0 if it had already ended.
_FINALIZE = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == 'promoted' or s == 'rejected' or s == 'failed' or s == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


@dataclass
class CycleRecord:
    """A cycle as `cycle status` shows it."""

    id: str
    state: str
    trigger: str
    token: int
    created_at: float
    finished_at: float | None
    reason: str
    failed_step: str
    parent_version: str
    candidate_version: str
    current_step: str
    config: dict[str, Any]
    steps: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    task_ids: list[str]

    @property
    def holder(self) -> Holder:
        return Holder(self.id, self.token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CycleStore:
    """Cycle records, flags and pointers in Redis (decode_responses clients and bytes both work)."""

    def __init__(self, client: redis.Redis, prefix: str = "il:", lock_ttl_s: float = 3600) -> None:
        self.client = client
        self.keys = LoopKeys(prefix)
        self.prefix = prefix
        self.lock = CycleLock(client, self.keys.lock, self.keys.fence, lock_ttl_s)
        self._finalize = client.register_script(_FINALIZE)

    # -- records
    def create(self, cycle_id: str, token: int, trigger: str, cfg: CycleConfig) -> None:
        now = time.time()
        self.client.hset(
            self.keys.cycle(cycle_id),
            mapping={
                "id": cycle_id,
                "state": "queued",
                "trigger": trigger,
                "token": token,
                "created_at": now,
                "config": json.dumps(cfg.to_dict()),
                "task_ids": "[]",
            },
        )
        self.client.zadd(self.keys.cycles, {cycle_id: now})
        self.client.set(self.keys.last_started, now)

    def get(self, cycle_id: str) -> CycleRecord | None:
        raw = {_s(k): _s(v) for k, v in self.client.hgetall(self.keys.cycle(cycle_id)).items()}
        if not raw:
            return None
        steps = {k[5:]: json.loads(v) for k, v in raw.items() if k.startswith("step:")}
        outputs = {k[4:]: json.loads(v) for k, v in raw.items() if k.startswith("out:")}
        return CycleRecord(
            id=raw["id"],
            state=raw.get("state", "queued"),
            trigger=raw.get("trigger", ""),
            token=int(raw.get("token", 0)),
            created_at=float(raw.get("created_at", 0)),
            finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None,
            reason=raw.get("reason", ""),
            failed_step=raw.get("failed_step", ""),
            parent_version=raw.get("parent_version", ""),
            candidate_version=raw.get("candidate_version", ""),
            current_step=raw.get("current_step", ""),
            config=json.loads(raw.get("config", "{}")),
            steps={s: steps[s] for s in STEPS if s in steps},
            outputs={s: outputs[s] for s in STEPS if s in outputs},
            task_ids=json.loads(raw.get("task_ids", "[]")),
        )

    def recent(self, n: int = 10) -> list[str]:
        return [_s(x) for x in self.client.zrevrange(self.keys.cycles, 0, n - 1)]

    def latest(self) -> CycleRecord | None:
        ids = self.recent(1)
        return self.get(ids[0]) if ids else None

    def set_fields(self, cycle_id: str, **values: Any) -> None:
        self.client.hset(self.keys.cycle(cycle_id), mapping={k: _enc(v) for k, v in values.items()})

    def step_state(self, cycle_id: str, step: str) -> dict[str, Any]:
        raw = self.client.hget(self.keys.cycle(cycle_id), f"step:{step}")
        return json.loads(raw) if raw else {}

    def set_step_state(self, cycle_id: str, step: str, state: dict[str, Any]) -> None:
        self.client.hset(self.keys.cycle(cycle_id), f"step:{step}", json.dumps(state))

    def output(self, cycle_id: str, step: str) -> dict[str, Any] | None:
        raw = self.client.hget(self.keys.cycle(cycle_id), f"out:{step}")
        return json.loads(raw) if raw else None

    def finalize(self, cycle_id: str, state: str, reason: str = "", **extra: Any) -> bool:
        """End the cycle (once): True if this call ended it."""
        assert state in TERMINAL
        values = {"state": state, "reason": reason, "finished_at": time.time(), "current_step": ""}
        values.update(extra)
        args: list[Any] = []
        for k, v in values.items():
            args.extend([k, _enc(v)])
        return bool(int(self._finalize(keys=[self.keys.cycle(cycle_id)], args=args)))

    # -- flags and pointers
    def request_cancel(self, cycle_id: str) -> None:
        self.client.set(self.keys.cancel(cycle_id), time.time())

    def cancel_requested(self, cycle_id: str) -> bool:
        return bool(self.client.exists(self.keys.cancel(cycle_id)))

    def last_reward_model(self) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.client.hgetall(self.keys.reward_model).items()}

    def feedback_count(self) -> int:
        """Rankings + comparisons stored so far (the feedback store's counters)."""
        stats = self.feedback_stats()
        return sum(stats.get(f"feedback:{k}", 0) for k in RANKING_KINDS)

    def feedback_stats(self) -> dict[str, int]:
        """The feedback store's counters: completions, feedback:<kind>."""
        from instructloop.feedback.keys import Keys

        raw = self.client.hgetall(Keys(self.prefix).stats)
        return {_s(k): int(v) for k, v in raw.items()}

    def new_feedback_since_last_rm(self) -> int:
        baseline = int(self.last_reward_model().get("feedback_count", 0) or 0)
        return max(0, self.feedback_count() - baseline)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _enc(v: Any) -> str | int | float:
    if isinstance(v, str | int | float) and not isinstance(v, bool):
        return v
    return json.dumps(v)


def new_cycle_id() -> str:
    return f"cyc-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


# --- the steps ----------------------------------------------------------------------------------


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

    def check(self) -> None:
        """Raise if the cycle was cancelled or its lock lost (call between pieces of work)."""
        self.heartbeat.check()


@dataclass
class StepResult:
    output: dict[str, Any]
    """Stored as the step's output (JSON)."""
    writes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Other hashes to set in the same fenced write, e.g. the last reward model pointer."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Figures for the step record and the metrics."""


def step_snapshot(ctx: StepContext) -> StepResult:
    """1. A consistent export of the feedback, recording the feedback ids it holds; and the
    version serving now, which this cycle trains from and compares against."""
    from instructloop.training import loop_adapters as ad

    live = ad.live_model(ctx.redis_url, ctx.prefix)
    if live is None:
        raise CycleError("no live model in the registry: register and promote one first")
    baseline = ctx.store.feedback_count()  # read before the export: never overcounts
    manifest = ad.export_snapshot(ctx.redis_url, ctx.prefix, ctx.dir / "export")
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
        "feedback_count": baseline,
        "parent_version": live["version"],
        "parent_path": live["path"],
    }
    return StepResult(out, summary={"feedback": n, "parent": live["version"]})


def step_reward_model(ctx: StepContext) -> StepResult:
    """2. Retrain the reward model on the snapshot, warm-started from the last one."""
    snap = ctx.outputs["snapshot"]
    last = ctx.store.last_reward_model()
    init = last.get("path") or ctx.config.initial_reward_model or snap["parent_path"]
    res = run_heavy(
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
    res = run_heavy(
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
    res = run_heavy(
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
    from instructloop.training import loop_adapters as ad

    snap = ctx.outputs["snapshot"]
    metrics = dict(ctx.outputs["evaluate"]["metrics"])
    checks = gate_checks(ctx.config, metrics)
    passed = all(checks.values())
    lineage_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    rm_m = ctx.outputs["reward_model"].get("metrics", {})
    ppo_m = ctx.outputs["ppo"].get("metrics", {})
    lineage_metrics.update({f"rm_{k}": float(v) for k, v in rm_m.items() if _num(v)})
    lineage_metrics.update({f"ppo_{k}": float(v) for k, v in ppo_m.items() if _num(v)})
    ctx.check()  # a cancelled or fenced-out cycle registers nothing
    version = ad.register_candidate(
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
    from instructloop.training import loop_adapters as ad

    gate = ctx.outputs["gate"]
    parent = ctx.outputs["snapshot"]["parent_version"]
    if not gate["passed"]:
        return StepResult({"promoted": False, "version": gate["version"]})
    live = ad.live_model(ctx.redis_url, ctx.prefix)
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
    ad.promote(ctx.redis_url, ctx.prefix, gate["version"])
    return StepResult({"promoted": True, "version": gate["version"]})


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


STEP_FUNCS: dict[str, Callable[[StepContext], StepResult]] = {
    "snapshot": step_snapshot,
    "reward_model": step_reward_model,
    "ppo": step_ppo,
    "evaluate": step_evaluate,
    "gate": step_gate,
    "promote": step_promote,
}


# --- heartbeat and heavy-step subprocess --------------------------------------------------------


class Heartbeat:
    """While a step runs: renew the cycle lock and the step's lease, and watch the cancel flag."""

    def __init__(self, store: CycleStore, holder: Holder, lease: Lease, period_s: float):
        self.store = store
        self.holder = holder
        self.lease = lease
        self.period_s = period_s
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.lease_lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cycle-heartbeat", daemon=True)

    def beat(self) -> None:
        if not self.lease.renew():
            self.lease_lost.set()
        if not self.store.lock.renew(self.holder):
            self.lost.set()
        if self.store.cancel_requested(self.holder.cycle_id):
            self.cancelled.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(redis.RedisError):  # a Redis blip: try again next beat
                self.beat()

    def check(self) -> None:
        if self.lease_lost.is_set():
            raise LeaseLost(f"another execution took over {self.lease.key}")
        if self.cancelled.is_set() or self.store.cancel_requested(self.holder.cycle_id):
            raise Cancelled()
        if self.lost.is_set():
            raise LockLost(f"cycle {self.holder.cycle_id} lost the cycle lock")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_PRCTL: Any = None


def _load_prctl() -> None:
    """Resolve prctl in the parent: the pre-exec hook must not load libraries (the worker has
    threads; a fork child may only do async-signal-safe work)."""
    global _PRCTL
    if _PRCTL is None:
        with contextlib.suppress(OSError, AttributeError):
            _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl


def _die_with_parent() -> None:
    """In the step subprocess, before exec: get SIGTERM when the task's process dies (Linux
    PR_SET_PDEATHSIG), which `_guard_group` turns into killing its whole process group (vLLM's
    engine core included). A killed worker leaves no orphan training run behind."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_heavy(ctx: StepContext, func: str, **kwargs: Any) -> dict[str, Any]:
    """Run `training.loop_adapters.<func>(**kwargs)` in a subprocess and return its result.

    Stops it on cancel, lost lock or the step time limit. Its output goes to `<dir>/step.log`;
    an error in it becomes this step's failure reason.
    """
    check_memory(ctx)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    in_path, out_path, log_path = (ctx.dir / n for n in ("input.json", "result.json", "step.log"))
    progress_path = ctx.dir / "progress.json"
    out_path.unlink(missing_ok=True)
    in_path.write_text(json.dumps({"func": func, "kwargs": kwargs}))
    cmd = [
        *(ctx.config.launcher or [sys.executable]),
        "-m",
        "instructloop.training.cycle",
        "run-step",
    ]
    cmd += [str(in_path), str(out_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env[PROGRESS_FILE_ENV] = str(progress_path)  # the stage's Progress writes it
    env[NICENESS_ENV] = str(ctx.niceness)
    _load_prctl()
    start = time.monotonic()
    progress_seen = 0.0
    with open(log_path, "ab") as log:
        # Its own process group, so stopping it stops what it started (vLLM's engine core).
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            while proc.poll() is None:
                try:
                    ctx.check()
                except (Cancelled, LockLost, LeaseLost):
                    _stop(proc)
                    raise
                if time.monotonic() - start > ctx.step_time_limit_s:
                    _stop(proc)
                    raise CycleError(f"{ctx.step} ran past the step time limit")
                progress_seen = _publish_progress(ctx, progress_path, progress_seen)
                time.sleep(0.5)
        finally:
            _stop(proc)  # also reaps what it left behind in its group
    _publish_progress(ctx, progress_path, progress_seen)  # its last word
    result = json.loads(out_path.read_text()) if out_path.exists() else None
    if result and "error" in result:
        raise CycleError(result["error"])
    if proc.returncode != 0 or result is None:
        tail = log_path.read_text(errors="replace")[-1500:].strip()
        raise CycleError(f"{func} exited with code {proc.returncode}: {tail}")
    return dict(result["result"])


def step_memory_need(cfg: CycleConfig, step: str) -> float:
    """GiB of free memory `step` needs before it starts (0: no check)."""
    need = {**recipe(cfg.recipe).step_memory_gib, **cfg.step_memory_gib}
    return float(need.get(step, 0.0))


def check_memory(ctx: StepContext) -> None:
    """Refuse a heavy step that would not fit in the memory available now (the server's engine
    keeps what it holds; instructloop/memory.py)."""
    need = step_memory_need(ctx.config, ctx.step)
    if need <= 0:
        return
    free = available_gib()
    if free < need:
        raise CycleError(
            f"not enough memory: the {ctx.step} step needs about {need:g} GiB free and "
            f"{free:.1f} GiB is available; not starting it, so serving keeps its memory. Free "
            "memory (a smaller serving KV cache: --kv-cache-space-gib), or lower the need with "
            f'the cycle config\'s step_memory_gib {{"{ctx.step}": ...}} if the estimate is high'
        )


def _publish_progress(ctx: StepContext, path: Path, seen: float) -> float:
    """Copy the step subprocess's progress file into the step's record when it changed; the
    file's mtime, for the next call."""
    try:
        mtime = path.stat().st_mtime
        if mtime <= seen:
            return seen
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return seen
    with contextlib.suppress(redis.RedisError):
        state = ctx.store.step_state(ctx.cycle_id, ctx.step)
        if state.get("state") == "running":
            ctx.store.set_step_state(ctx.cycle_id, ctx.step, {**state, "progress": progress})
    return mtime


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the step's process group, SIGKILL what is left after 10 s."""

    def group_alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (proc.poll() is None or group_alive()):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _guard_group() -> None:
    """In the step subprocess: if the task's process goes away (worker killed) or SIGTERM comes
    (cancel), kill this whole process group, children included."""
    if os.getpgrp() != os.getpid():
        return  # not started by run_heavy as a group leader (e.g. a torchrun rank)
    parent = os.getppid()

    def kill_group(*_a: Any) -> None:
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_group)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                kill_group()
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _lower_priority() -> None:
    """In the step subprocess, before anything heavy loads (the engines it starts inherit it):
    the lowest CPU priority, and the OOM killer's first choice (see STEP_NICENESS,
    OOM_SCORE_ADJ)."""
    niceness = int(os.environ.get(NICENESS_ENV, STEP_NICENESS))
    with contextlib.suppress(OSError):
        os.nice(max(0, niceness - os.nice(0)))
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(OOM_SCORE_ADJ))


def _process_facts() -> dict[str, float]:
    """How the step ran, for its record: peak resident memory of this process and of its
    largest ended child (vLLM's engine), its niceness and OOM score adjustment."""
    import resource

    try:
        oom_adj = float(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        oom_adj = float("nan")

    gib = 1024 * 1024  # ru_maxrss is in KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "peak_rss_gib": round(own / gib, 2),
        "peak_rss_child_gib": round(child / gib, 2),
        "niceness": float(os.nice(0)),
        "oom_score_adj": oom_adj,
    }


def _child_main(in_path: str, out_path: str) -> int:
    """The heavy step's subprocess: call the adapter, write {"result"} or {"error"}."""
    _guard_group()
    _lower_priority()
    from instructloop.training import loop_adapters

    spec = json.loads(Path(in_path).read_text())
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        result = getattr(loop_adapters, spec["func"])(**spec["kwargs"])
        if isinstance(result, dict) and isinstance(result.get("metrics"), dict):
            result["metrics"].update(_process_facts())
        payload: dict[str, Any] = {"result": result}
        rc = 0
    except Exception as e:
        traceback.print_exc()
        payload = {"error": f"{type(e).__name__}: {e}"}
        rc = 1
    if rank0:
        tmp = Path(out_path + ".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, out_path)
    return rc


# --- running one step (what each Celery task does) ----------------------------------------------


@dataclass
class StepRun:
    """How `run_step` ended: "done" (continue the chain), "skipped" (the output was there:
    continue the chain), or "stopped" (the cycle ended or another execution owns the step:
    do not continue)."""

    status: str
    detail: str = ""


def run_step(
    step: str,
    cycle_id: str,
    token: int,
    *,
    client: redis.Redis,
    redis_url: str,
    prefix: str,
    lock_ttl_s: float,
    heartbeat_s: float,
    step_time_limit_s: float,
    step_niceness: int = STEP_NICENESS,
) -> StepRun:
    """Run one step of a cycle idempotently, fenced and cancellable (see module docstring).

    Raises CycleError after recording a failure (so Celery marks the task failed and the chain
    stops); returns a StepRun otherwise.
    """
    from instructloop.training import loop_metrics

    if step not in STEP_FUNCS:
        raise ValueError(f"unknown step {step!r}")
    store = CycleStore(client, prefix, lock_ttl_s)
    holder = Holder(cycle_id, int(token))
    rec = store.get(cycle_id)
    if rec is None:
        return StepRun("stopped", f"no cycle record {cycle_id}")
    if rec.state in TERMINAL:
        return StepRun("stopped", f"cycle already {rec.state}")
    if rec.token != holder.token:
        return StepRun("stopped", "token does not match the cycle record")
    if store.cancel_requested(cycle_id):
        _end(store, rec, "cancelled", "cancelled by request", step)
        return StepRun("stopped", "cancelled")
    if not store.lock.renew(holder):
        cur = store.lock.holder()
        reason = f"fenced out: the cycle lock is held by {cur.value if cur else 'nobody'}"
        _end(store, rec, "failed", reason, step, error="LockLost")
        return StepRun("stopped", reason)
    if store.output(cycle_id, step) is not None:
        if step == STEPS[-1]:
            _finish(store, rec)
        return StepRun("skipped", "output already recorded")
    missing = [s for s in STEPS[: STEPS.index(step)] if store.output(cycle_id, s) is None]
    if missing:
        reason = f"{step}: earlier step(s) {', '.join(missing)} have no output"
        _end(store, rec, "failed", reason, step, error="CycleError")
        raise CycleError(reason)
    lease = Lease(client, store.keys.lease(cycle_id, step), lease_ttl(heartbeat_s))
    if not lease.acquire():
        return StepRun("stopped", "another execution holds this step's lease")

    cfg = CycleConfig.from_dict(rec.config)
    state = store.step_state(cycle_id, step)
    attempts = int(state.get("attempts", 0)) + 1
    # Each execution writes into its own directory; an interrupted one's partial files go.
    step_root = Path(cfg.work_dir) / cycle_id / step
    if step_root.exists():
        for old in step_root.iterdir():
            shutil.rmtree(old, ignore_errors=True)
    step_dir = step_root / f"attempt-{attempts}"
    step_dir.mkdir(parents=True)
    started = time.time()
    store.set_step_state(
        cycle_id, step, {"state": "running", "started_at": started, "attempts": attempts}
    )
    store.set_fields(cycle_id, state="running", current_step=step)
    t0 = time.monotonic()
    try:
        with Heartbeat(store, holder, lease, heartbeat_s) as hb:
            ctx = StepContext(
                cycle_id=cycle_id,
                step=step,
                config=cfg,
                redis_url=redis_url,
                prefix=prefix,
                store=store,
                holder=holder,
                dir=step_dir,
                outputs={s: store.output(cycle_id, s) or {} for s in STEPS[: STEPS.index(step)]},
                heartbeat=hb,
                step_time_limit_s=step_time_limit_s,
                niceness=step_niceness,
            )
            result = STEP_FUNCS[step](ctx)
            hb.check()
            extra: dict[str, Any] = {}
            if step == "snapshot":
                extra["parent_version"] = result.output["parent_version"]
            if step == "gate":
                extra["candidate_version"] = result.output["version"]
            done = {
                "state": "done",
                "started_at": started,
                "finished_at": time.time(),
                "seconds": round(time.monotonic() - t0, 3),
                "attempts": attempts,
                "summary": result.summary,
            }
            last_progress = store.step_state(cycle_id, step).get("progress")
            if last_progress:
                done["progress"] = last_progress  # how far it got: the whole run, normally
            writes = {
                store.keys.cycle(cycle_id): {
                    f"out:{step}": json.dumps(result.output),
                    f"step:{step}": json.dumps(done),
                    **{k: _enc(v) for k, v in extra.items()},
                },
                **{k: {f: _enc(v) for f, v in m.items()} for k, m in result.writes.items()},
            }
            # Written only while this cycle holds the lock AND this execution holds the step.
            status = store.lock.fenced_write(holder, writes, require={lease.key: lease.owner})
            if status == "requirement_failed":
                raise LeaseLost(f"another execution took over {lease.key}")
            if status != "ok":
                raise LockLost(f"cycle {cycle_id} lost the cycle lock before writing {step}")
    except LeaseLost as e:
        return StepRun("stopped", str(e))  # the step and the cycle belong to the other one
    except Exception as e:
        if not _still_owner(lease):
            return StepRun("stopped", f"{step} was taken over by another execution")
        if isinstance(e, Cancelled):
            _step_ended(store, cycle_id, step, "cancelled", started, attempts, t0)
            _end(store, rec, "cancelled", "cancelled by request", step)
            return StepRun("stopped", "cancelled")
        if isinstance(e, LockLost):
            _step_ended(store, cycle_id, step, "failed", started, attempts, t0, str(e))
            _end(store, rec, "failed", f"fenced out: {e}", step, error="LockLost")
            return StepRun("stopped", str(e))
        reason = f"{step}: {e}" if isinstance(e, CycleError) else f"{step}: {type(e).__name__}: {e}"
        _step_ended(store, cycle_id, step, "failed", started, attempts, t0, reason)
        _end(store, rec, "failed", reason, step, error=type(e).__name__)
        raise CycleError(reason) from e
    finally:
        with contextlib.suppress(redis.RedisError):
            lease.release()
    loop_metrics.step_finished(step, "done", time.monotonic() - t0)
    loop_metrics.training_metrics(step, result.summary)
    if step == "gate":
        loop_metrics.gate_results(result.output["checks"])
    if step == STEPS[-1]:
        _finish(store, rec)
    return StepRun("done")


def lease_ttl(heartbeat_s: float) -> float:
    """A step's lease outlives six missed heartbeats: a busy machine does not lose it, a dead
    execution is noticed within seconds."""
    return 6 * heartbeat_s


def _still_owner(lease: Lease) -> bool:
    try:
        return lease.renew()
    except redis.RedisError:
        return True  # cannot tell: record the failure (the cycle ends either way)


def _step_ended(
    store: CycleStore,
    cycle_id: str,
    step: str,
    state: str,
    started: float,
    attempts: int,
    t0: float,
    error: str = "",
) -> None:
    from instructloop.training import loop_metrics

    seconds = time.monotonic() - t0
    entry = {
        "state": state,
        "started_at": started,
        "finished_at": time.time(),
        "seconds": round(seconds, 3),
        "attempts": attempts,
    }
    if error:
        entry["error"] = error
    store.set_step_state(cycle_id, step, entry)
    loop_metrics.step_finished(step, state, seconds)


def _end(
    store: CycleStore,
    rec: CycleRecord,
    state: str,
    reason: str,
    step: str,
    error: str | None = None,
) -> None:
    """Finalize (once), release the lock if still ours, count it."""
    from instructloop.training import loop_metrics

    extra = {"failed_step": step} if state == "failed" else {}
    if store.finalize(rec.id, state, reason, **extra):
        loop_metrics.cycle_finished(state, step, error)
    store.lock.release(rec.holder)
    store.client.delete(store.keys.cancel(rec.id))


def _finish(store: CycleStore, rec: CycleRecord) -> None:
    out = store.output(rec.id, "promote") or {}
    state = "promoted" if out.get("promoted") else "rejected"
    reason = (
        ""
        if state == "promoted"
        else "gate failed: "
        + ", ".join(
            k for k, ok in (store.output(rec.id, "gate") or {}).get("checks", {}).items() if not ok
        )
    )
    _end(store, rec, state, reason, "promote")


# --- starting and cancelling cycles -------------------------------------------------------------


@dataclass
class CycleStart:
    cycle_id: str
    token: int
    task_ids: list[str]


def start_cycle(
    app: Any,
    client: redis.Redis,
    *,
    prefix: str,
    queue: str,
    lock_ttl_s: float,
    cfg: CycleConfig,
    trigger: str,
) -> CycleStart:
    """Take the cycle lock and send the cycle's chain of tasks. Raises CycleBusy when another
    cycle holds the lock (the caller decides: `cycle run` refuses, beat skips the tick)."""
    from instructloop.training import loop_metrics

    store = CycleStore(client, prefix, lock_ttl_s)
    cycle_id = new_cycle_id()
    token = store.lock.acquire(cycle_id)
    if token is None:
        loop_metrics.trigger(trigger, "busy")
        raise CycleBusy(store.lock.holder())
    store.create(cycle_id, token, trigger, cfg)
    try:
        task_ids = _send_chain(app, store, cycle_id, token, STEPS, queue)
    except Exception as e:
        rec = store.get(cycle_id)
        assert rec is not None
        reason = f"could not send the cycle's tasks: {e}"
        _end(store, rec, "failed", reason, "start", type(e).__name__)
        raise
    loop_metrics.trigger(trigger, "started")
    return CycleStart(cycle_id, token, task_ids)


def _send_chain(
    app: Any, store: CycleStore, cycle_id: str, token: int, steps: tuple[str, ...], queue: str
) -> list[str]:
    """Send `steps` as a Celery chain; their task ids are added to the record first (for
    `cycle cancel`)."""
    from celery import chain

    sigs = [
        app.signature(f"training.cycle.{s}", args=(cycle_id, token), immutable=True, queue=queue)
        for s in steps
    ]
    flow = chain(*sigs)
    flow.freeze()
    task_ids = [str(s.id) for s in flow.tasks]
    rec = store.get(cycle_id)
    store.set_fields(cycle_id, task_ids=(rec.task_ids if rec else []) + task_ids)
    flow.apply_async()
    return task_ids


def resume_stalled(app: Any, store: CycleStore, queue: str) -> str | None:
    """Resume the running cycle if the execution of its current step died (its lease expired
    with no output written): send the rest of the chain again, from that step on. The worker
    runs this when it starts and the beat's tick runs it, so a killed worker's cycle goes on
    within seconds instead of after the broker's visibility timeout. (When that timeout later
    hands the dead worker's message out again, the step finds its output and is skipped.)
    Returns the resumed cycle id."""
    holder = store.lock.holder()
    if holder is None:
        return None
    rec = store.get(holder.cycle_id)
    if rec is None or rec.state in TERMINAL or rec.token != holder.token or not rec.current_step:
        return None
    step = rec.current_step
    st = rec.steps.get(step, {})
    if st.get("state") != "running" or store.output(rec.id, step) is not None:
        return None
    if store.client.exists(store.keys.lease(rec.id, step)):
        return None  # its execution is alive
    # Once per interrupted attempt, however many workers and ticks look at it.
    claim = f"{store.prefix}loop:resume:{rec.id}:{step}:{st.get('attempts', 0)}"
    if not store.client.set(claim, time.time(), nx=True, ex=7 * 86400):
        return None
    store.set_step_state(rec.id, step, {**st, "state": "interrupted"})
    _send_chain(app, store, rec.id, rec.token, STEPS[STEPS.index(step) :], queue)
    from instructloop.training import loop_metrics

    loop_metrics.trigger("resume", "started")
    return rec.id


def due_trigger(
    store: CycleStore, *, every_s: float, threshold: int, min_new: int, now: float | None = None
) -> str | None:
    """Which trigger fires now, if any: "threshold" (N new rankings/comparisons since the last
    reward model) or "schedule" (every_s since the last cycle started, with some new feedback)."""
    new = store.new_feedback_since_last_rm()
    if threshold > 0 and new >= threshold:
        return "threshold"
    if every_s > 0 and new >= max(1, min_new):
        now = time.time() if now is None else now
        anchor_key = store.keys.last_started
        store.client.set(anchor_key, now, nx=True)  # the schedule starts with the first tick
        last = float(_s(store.client.get(anchor_key) or now))
        if now - last >= every_s:
            return "schedule"
    return None


def cancel_cycle(app: Any, store: CycleStore, cycle_id: str, force: bool = False) -> str:
    """Request cancellation; with `force`, also end the cycle now and release its lock (for a
    cycle no worker will ever pick up again). Returns the state after the request."""
    rec = store.get(cycle_id)
    if rec is None:
        raise KeyError(cycle_id)
    if rec.state in TERMINAL:
        return rec.state
    store.request_cancel(cycle_id)
    store.set_fields(cycle_id, cancel_requested_at=time.time())
    # Tasks of the chain not yet started are dropped by the workers; a worker that is down gets
    # no revoke, and then the flag stops the cycle at its next step.
    with contextlib.suppress(Exception):
        app.control.revoke(rec.task_ids)
    if force:
        if store.finalize(cycle_id, "cancelled", "cancelled by request (forced)"):
            from instructloop.training import loop_metrics

            loop_metrics.cycle_finished("cancelled")
        store.lock.release(rec.holder)
        store.client.delete(store.keys.cancel(cycle_id))
    cur = store.get(cycle_id)
    return cur.state if cur else "unknown"


def on_task_revoked(store: CycleStore, cycle_id: str, token: int, step: str) -> None:
    """A worker dropped a revoked step task: the chain stops here, so end the cycle."""
    rec = store.get(cycle_id)
    if rec is None or rec.state in TERMINAL or rec.token != int(token):
        return
    _end(store, rec, "cancelled", "cancelled by request", step)


@contextlib.contextmanager
def redis_client(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
    try:
        yield client
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cycle")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rs = sub.add_parser("run-step", help="(internal) run a heavy step's function")
    rs.add_argument("input")
    rs.add_argument("output")
    args = parser.parse_args(argv)
    return _child_main(args.input, args.output)


if __name__ == "__main__":
    sys.exit(main())
