"""The Celery app of the training loop: Redis as broker and result backend, one `training` queue.

How a worker takes work, and why:
- `worker_concurrency=1`, `worker_prefetch_multiplier=1`: one task at a time per worker, and a
  worker reserves no second message while it trains. A training step fills the machine (all
  CPU cores, or the GPUs through torchrun/accelerate); scale out with more workers (machines),
  not more slots per worker.
- `task_acks_late=True`: a message is acknowledged after its task ends, so a worker that dies
  mid-step leaves it unacknowledged and it is delivered again; the steps are idempotent
  (training/cycle.py), so the redelivered step finds finished work done and redoes only its own.
- `task_reject_on_worker_lost=True`: if the pool child running a task dies (OOM killer, a
  segfault in a native library), the message goes back to the queue instead of being acked.
- `visibility_timeout`: Redis has no real acks; kombu keeps unacked messages aside and hands
  them to another worker once they are older than this. A long step must finish well inside it,
  or a second worker would start the same step while the first still runs. It is therefore set
  above the step time limit, which the cycle enforces (`LoopConfig.__post_init__` checks it).
  The price: after a worker crash, the step resumes only once the timeout has passed.
- results expire (`result_expires`), json serialisation only (no pickle from the broker).

Pool: prefork with one child by default. The heavy steps run in a subprocess of the task (so a
step can be cancelled, its memory is freed and a multi-GPU launcher can be used), so the pool
child itself stays light; prefork keeps the worker's main process (broker connection, metrics
server) alive when a task's process dies, and needs Prometheus' multiprocess mode for the
task metrics (training/loop_metrics.py). On GPU machines the same holds: the pool child never
touches CUDA (only the step's subprocess does), so forking it is safe. `--pool solo` works too
(one process; no hard time limit).

Configuration comes from `LoopConfig.from_env()`, read when this module is imported, so
`celery -A training.celery_app worker` works as well as `instructloop worker`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from celery import Celery, signals
from celery.beat import Scheduler

from instructloop.running import DEFAULT_REDIS_URL

TICK_TASK = "training.loop.tick"


@dataclass
class LoopConfig:
    """Settings of the Celery side of the loop (workers, beat, locks). Environment variables
    `INSTRUCTLOOP_<FIELD>` (upper case) override the defaults; `redis_url` also reads REDIS_URL.
    Every worker and beat of one deployment must use the same values."""

    redis_url: str = DEFAULT_REDIS_URL
    """Broker, result backend and the loop's own keys (docs/INTERFACES.md default)."""

    key_prefix: str = "il:"
    """Prefix of every Redis key the loop writes (cycle records, locks, flags)."""

    queue: str = "training"
    """The queue the cycle's tasks and the beat's ticks go to."""

    step_time_limit_s: int = 5 * 3600
    """A cycle step running longer than this is stopped and the cycle fails. PPO on the default
    model on a 2-core CPU takes minutes; this bounds a step that hangs."""

    visibility_timeout_s: int = 6 * 3600
    """Broker redelivery of unacknowledged messages (see module docstring). Must exceed
    `step_time_limit_s`, so a running step is never handed to a second worker."""

    restore_interval_s: int = 10
    """How often a worker looks for unacknowledged messages older than the visibility timeout
    (kombu's unacked_restore_interval, with the throttle set to 1)."""

    lock_ttl_s: int = 0
    """TTL of the cycle lock, renewed every `heartbeat_s` while a step runs. 0 means
    visibility_timeout_s + 2 * restore_interval_s + 60: a cycle whose worker crashed keeps the
    lock until its step is redelivered, so no other cycle starts in between."""

    step_niceness: int = 19
    """CPU niceness of the heavy steps' subprocesses (0-19): at 19 a server on the same cores
    keeps its latency while a cycle trains, and training takes the cycles serving leaves
    idle. Lower it on a machine that only trains."""

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
            values[f.name] = type(default)(raw) if not isinstance(default, str) else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` rebuild this config in another process."""
        return {f"INSTRUCTLOOP_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}


def create_app(cfg: LoopConfig) -> Celery:
    app = Celery("instructloop", broker=cfg.redis_url, backend=cfg.redis_url)
    app.conf.update(
        include=["instructloop.training.tasks"],
        task_default_queue=cfg.queue,
        task_create_missing_queues=True,
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A hard backstop behind the cycle's own step limit (prefork only; the cycle stops
        # a step's subprocess itself at step_time_limit_s).
        task_time_limit=cfg.step_time_limit_s + 600,
        broker_transport_options={
            "visibility_timeout": cfg.visibility_timeout_s,
            "unacked_restore_interval": cfg.restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": cfg.visibility_timeout_s},
        result_expires=cfg.result_expires_s,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        # Beat renews its lock on every loop; it must loop well inside the lock's TTL.
        beat_max_loop_interval=max(1, cfg.beat_lock_ttl_s // 3),
        timezone="UTC",
    )
    app.loop_config = cfg  # type: ignore[attr-defined]
    return app


app = create_app(LoopConfig.from_env())


def loop_config() -> LoopConfig:
    return app.loop_config  # type: ignore[attr-defined,no-any-return]


# --- task metrics (prometheus_client; multiprocess mode under the prefork pool) ----------------


@signals.task_prerun.connect
def _on_task_prerun(task_id: str | None = None, **_kw: Any) -> None:
    from instructloop.training import loop_metrics

    if task_id:
        loop_metrics.task_started(task_id)


@signals.task_postrun.connect
def _on_task_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_kw: Any
) -> None:
    from instructloop.training import loop_metrics

    if task_id:
        loop_metrics.task_ended(task_id, getattr(task, "name", "unknown"), state or "UNKNOWN")


@signals.task_revoked.connect
def _on_task_revoked(request: Any = None, **_kw: Any) -> None:
    from instructloop.training import loop_metrics

    name = getattr(request, "task_name", None) or getattr(request, "name", None) or "unknown"
    loop_metrics.TASKS.labels(task=name, state="REVOKED").inc()


@signals.worker_process_shutdown.connect
def _on_child_exit(pid: int | None = None, **_kw: Any) -> None:
    from instructloop.training import loop_metrics

    loop_metrics.mark_process_dead(pid or os.getpid())


@signals.worker_init.connect
def _on_worker_init(**_kw: Any) -> None:
    port = os.environ.get("INSTRUCTLOOP_WORKER_METRICS_PORT")
    if port and int(port) > 0:
        from instructloop.training import loop_metrics

        loop_metrics.start_metrics_server(int(port))


# --- beat: the single active scheduler --------------------------------------------------------


class LockedScheduler(Scheduler):
    """Celery's in-memory scheduler that runs only while it holds the beat lock.

    `instructloop beat` acquires the lock before starting beat and sets `beat_lock`; every tick
    renews it first, so a beat that lost its lock (paused past the TTL, partitioned away) stops
    before it sends anything. The schedule needs no state on disk: the tick task decides from
    Redis whether a cycle is due.
    """

    beat_lock: Any = None  # training.locks.BeatLock, set by the CLI before beat starts

    def tick(self, *args: Any, **kwargs: Any) -> float:
        lock = type(self).beat_lock
        if lock is not None and not lock.renew():
            raise SystemExit(f"beat lock {lock.key} lost; stopping this beat")
        return float(super().tick(*args, **kwargs))
