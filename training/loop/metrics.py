"""Prometheus metrics of the training loop (cycles, steps, gate, Celery tasks).

The worker's prefork pool runs tasks in child processes, so metrics use prometheus_client's
multiprocess mode: every process writes its samples to files in PROMETHEUS_MULTIPROC_DIR, and the
worker's main process serves the sum of them on its metrics port (`start_metrics_server`).
`instructloop worker` sets that variable (an empty directory of its own) BEFORE anything imports
prometheus_client, because prometheus_client picks its value store at import time. Without the
variable (tests of single functions, `--pool solo`) the metrics are plain in-process metrics.

Names (all `instructloop_` prefixed):
- cycles_total{outcome}: promoted, rejected (gate failed), failed, cancelled
- cycle_failures_total{step, error}: failed cycles by step and error class (the reason text is in
  the cycle record in Redis; labels stay bounded)
- cycle_step_seconds{step, outcome}: step durations (done, failed, cancelled)
- cycle_triggers_total{trigger, result}: schedule / threshold / manual, started or skipped
- reward_model_accuracy, ppo_reward, ppo_kl: last trained values (gauges)
- eval_metric{name}: last evaluation figures (win rates, ptx loss, constraint accuracy)
- gate_checks_total{check, result}, gate_passed{check}: gate results
- celery_tasks_total{task, state}, celery_task_seconds{task}: Celery task outcomes and durations
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Steps take seconds (tiny models) to hours (PPO on a real model).
_STEP_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))

CYCLES = Counter("instructloop_cycles_total", "Finished training cycles by outcome", ["outcome"])
CYCLE_FAILURES = Counter(
    "instructloop_cycle_failures_total", "Failed cycles by step and error class", ["step", "error"]
)
STEP_SECONDS = Histogram(
    "instructloop_cycle_step_seconds",
    "Duration of one execution of a cycle step",
    ["step", "outcome"],
    buckets=_STEP_BUCKETS,
)
TRIGGERS = Counter(
    "instructloop_cycle_triggers_total", "Cycle triggers by kind and result", ["trigger", "result"]
)
# "mostrecent": the value last set by any process is what the training produced last.
RM_ACCURACY = Gauge(
    "instructloop_reward_model_accuracy",
    "Held-out pairwise accuracy of the last trained reward model",
    multiprocess_mode="mostrecent",
)
PPO_REWARD = Gauge(
    "instructloop_ppo_reward", "Mean reward of the last PPO run", multiprocess_mode="mostrecent"
)
PPO_KL = Gauge(
    "instructloop_ppo_kl", "Mean KL to the reference of the last PPO run",
    multiprocess_mode="mostrecent",
)  # fmt: skip
EVAL_METRIC = Gauge(
    "instructloop_eval_metric",
    "Last evaluation of a candidate against the serving policy",
    ["name"],
    multiprocess_mode="mostrecent",
)
GATE_CHECKS = Counter(
    "instructloop_gate_checks_total", "Gate checks by check and result", ["check", "result"]
)
GATE_PASSED = Gauge(
    "instructloop_gate_passed",
    "Last gate result per check (1 passed, 0 failed)",
    ["check"],
    multiprocess_mode="mostrecent",
)
TASKS = Counter(
    "instructloop_celery_tasks_total", "Celery tasks by name and final state", ["task", "state"]
)
TASK_SECONDS = Histogram(
    "instructloop_celery_task_seconds", "Celery task run time", ["task"], buckets=_STEP_BUCKETS
)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def prepare_multiproc_dir(path: Path) -> Path:
    """Empty `path` and point PROMETHEUS_MULTIPROC_DIR at it (call before importing this module's
    metrics in any process: the worker CLI does it first thing). Stale files from a previous run
    would otherwise be summed into the new one."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Serve /metrics from this process (the worker's main process); returns the bound port."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_port)


def mark_process_dead(pid: int) -> None:
    """Drop a dead pool child's live gauges (multiprocess mode only)."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# --- recording helpers (called by runner.py and triggers.py) ------------------------------------


def step_finished(step: str, outcome: str, seconds: float) -> None:
    STEP_SECONDS.labels(step=step, outcome=outcome).observe(seconds)


def cycle_finished(outcome: str, step: str | None = None, error: str | None = None) -> None:
    CYCLES.labels(outcome=outcome).inc()
    if outcome == "failed":
        CYCLE_FAILURES.labels(step=step or "unknown", error=error or "unknown").inc()


def trigger(kind: str, result: str) -> None:
    TRIGGERS.labels(trigger=kind, result=result).inc()


def training_metrics(step: str, metrics: dict[str, Any]) -> None:
    """Export a step's figures: RM accuracy, PPO reward and KL, evaluation results."""
    if step == "reward_model" and "accuracy" in metrics:
        RM_ACCURACY.set(float(metrics["accuracy"]))
    elif step == "ppo":
        if "reward" in metrics:
            PPO_REWARD.set(float(metrics["reward"]))
        if "kl" in metrics:
            PPO_KL.set(float(metrics["kl"]))
    elif step == "evaluate":
        for name, value in metrics.items():
            if isinstance(value, int | float):
                EVAL_METRIC.labels(name=name).set(float(value))


def gate_results(checks: dict[str, bool]) -> None:
    for check, ok in checks.items():
        GATE_CHECKS.labels(check=check, result="passed" if ok else "failed").inc()
        GATE_PASSED.labels(check=check).set(1.0 if ok else 0.0)


# --- Celery task metrics (connected in celery_app.py) -------------------------------------------

_task_started: dict[str, float] = {}


def task_started(task_id: str) -> None:
    _task_started[task_id] = time.monotonic()


def task_ended(task_id: str, task_name: str, state: str) -> None:
    TASKS.labels(task=task_name, state=state).inc()
    start = _task_started.pop(task_id, None)
    if start is not None:
        TASK_SECONDS.labels(task=task_name).observe(time.monotonic() - start)
