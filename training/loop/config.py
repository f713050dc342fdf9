"""The loop's two configs: `CycleConfig` (what one cycle does) and `LoopConfig` (how the workers,
the beat and the locks run).

A cycle's config is stored in its record when it starts, so every step, on whichever worker, runs
with the same settings. The loop config comes from the environment, and every worker and beat of
one deployment must share it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from instructloop.feedback.keys import DEFAULT_KEY_PREFIX, DEFAULT_REDIS_URL
from instructloop.feedback.poisoning import SourceCaps
from instructloop.paths import data_dir
from instructloop.training.recipes import DEFAULT_RECIPE, recipe

STEPS: tuple[str, ...] = ("snapshot", "reward_model", "ppo", "evaluate", "gate", "promote")
HEAVY_STEPS = frozenset({"reward_model", "ppo", "evaluate"})
"""The steps that train or generate: they run in a subprocess (supervise.py)."""

STEP_NICENESS = 19
"""Heavy steps run at the lowest CPU priority: a server on the same cores keeps its latency,
and training takes the cycles serving leaves idle."""


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _default_work_dir() -> str:
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

    snapshot_max_user_share: float = SourceCaps.max_user_share
    """Most of a snapshot's rankings + comparisons one user may supply; the rest of a flood is
    dropped and reported (feedback/poisoning.py: a few percent of poisoned preferences steer a
    reward model)."""

    snapshot_max_principal_share: float = SourceCaps.max_principal_share
    """Most one API key's principal may supply (1.0: no cap; one app key usually carries all
    of its users)."""

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
    ["accelerate", "launch"]; the cycle appends
    ["-m", "instructloop.training.loop.supervise", "run-step", ...].
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
        self.source_caps()  # shares out of (0, 1] fail here too
        bad = sorted(set(self.step_memory_gib) - HEAVY_STEPS)
        if bad:
            raise ValueError(f"step_memory_gib: not heavy steps: {', '.join(bad)}")
        if not all(is_number(v) and v >= 0 for v in self.step_memory_gib.values()):
            raise ValueError("step_memory_gib: values must be GiB >= 0")
        if not isinstance(self.launcher, list) or not all(
            isinstance(a, str) for a in self.launcher
        ):
            raise ValueError("launcher must be a list of strings")

    def source_caps(self) -> SourceCaps:
        """The snapshot's caps on one source's share of the preference data."""
        return SourceCaps(self.snapshot_max_user_share, self.snapshot_max_principal_share)

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

    def step_memory_need(self, step: str) -> float:
        """GiB of free memory `step` needs before it starts (0: no check)."""
        need = {**recipe(self.recipe).step_memory_gib, **self.step_memory_gib}
        return float(need.get(step, 0.0))


@dataclass
class LoopConfig:
    """Settings of the Celery side of the loop (workers, beat, locks). Environment variables
    `INSTRUCTLOOP_<FIELD>` (upper case) override the defaults; `redis_url` also reads REDIS_URL.
    Every worker and beat of one deployment must use the same values."""

    redis_url: str = DEFAULT_REDIS_URL
    """Broker, result backend and the loop's own keys (docs/INTERFACES.md default)."""

    key_prefix: str = DEFAULT_KEY_PREFIX
    """Prefix of every Redis key the loop writes (cycle records, locks, flags)."""

    queue: str = "training"
    """The queue the cycle's tasks and the beat's ticks go to."""

    step_time_limit_s: int = 5 * 3600
    """A cycle step running longer than this is stopped and the cycle fails: it bounds a step
    that hangs, far above what PPO on the default model needs."""

    visibility_timeout_s: int = 6 * 3600
    """Broker redelivery of unacknowledged messages (celery_app.py says why). Must exceed
    `step_time_limit_s`, so a running step is never handed to a second worker."""

    restore_interval_s: int = 10
    """How often a worker looks for unacknowledged messages older than the visibility timeout
    (kombu's unacked_restore_interval, with the throttle set to 1)."""

    lock_ttl_s: int = 0
    """TTL of the cycle lock, renewed every `heartbeat_s` while a step runs. 0 means
    visibility_timeout_s + 2 * restore_interval_s + 60: a cycle whose worker crashed keeps the
    lock until its step is redelivered, so no other cycle starts in between."""

    step_niceness: int = STEP_NICENESS
    """CPU niceness of the heavy steps' subprocesses (0-19): at 19 a server on the same cores
    keeps its latency while a cycle trains, and training takes the cycles serving leaves
    idle. Lower it on a machine that only trains."""

    yield_to_serving: bool = True
    """Pause a heavy step while a server on this machine has requests in flight
    (training/loop/yielding.py): serving's latency holds while a cycle trains. Turn it off on a
    machine that only trains."""

    heartbeat_s: float = 5.0
    """Period of lock renewal and of the cancel check while a step runs."""

    result_expires_s: int = 7 * 86400
    """Celery task results are kept this long (the cycle record in Redis is kept for good)."""

    beat_lock_ttl_s: int = 30
    """TTL of the single-beat lock; the active beat renews it every third of it. A standby beat
    takes over at most this long after the active one dies."""

    def __post_init__(self) -> None:
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty")
        if self.step_time_limit_s <= 0:
            raise ValueError("step_time_limit_s must be positive")
        if self.visibility_timeout_s <= self.step_time_limit_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed "
                f"step_time_limit_s ({self.step_time_limit_s}): otherwise a step still running "
                "is redelivered to another worker"
            )
        if not 0 <= self.step_niceness <= 19:
            raise ValueError(f"step_niceness must be in 0..19, got {self.step_niceness}")
        if self.restore_interval_s <= 0 or self.heartbeat_s <= 0 or self.beat_lock_ttl_s <= 0:
            raise ValueError("restore_interval_s, heartbeat_s and beat_lock_ttl_s must be > 0")
        if self.lock_ttl_s == 0:
            self.lock_ttl_s = self.visibility_timeout_s + 2 * self.restore_interval_s + 60
        if self.lock_ttl_s <= 3 * self.heartbeat_s:
            raise ValueError("lock_ttl_s must exceed three heartbeats")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> LoopConfig:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        if env.get("REDIS_URL"):
            values["redis_url"] = env["REDIS_URL"]
        for f in fields(cls):
            raw = env.get(f"INSTRUCTLOOP_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            default = f.default
            if isinstance(default, bool):
                values[f.name] = _flag(f.name, raw)
            else:
                values[f.name] = type(default)(raw) if not isinstance(default, str) else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` rebuild this config in another process."""
        return {f"INSTRUCTLOOP_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}


def _flag(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"INSTRUCTLOOP_{name.upper()} must be true or false, got {raw!r}")
