"""Celery tasks of the training loop: one task per cycle step, and the beat's tick.

The tasks are thin: the work, its idempotence, fencing and cancellation live in runner.py
(`run_step`). A cycle is the chain `snapshot | reward_model | ppo | evaluate | gate | promote`,
each task called with (cycle_id, token); a step's inputs are the earlier steps' outputs in the
cycle record, not Celery results, so a step redelivered after a crash needs nothing from the
broker but its id.

A step that ends the cycle (cancelled, fenced out, or another execution owns it) raises Ignore:
the chain stops there without a failure. A failed step raises, so Celery records FAILURE and
stops the chain; the cycle record already holds the reason.

The task names (`training.cycle.<step>`, `training.loop.tick`) are wire names, in the broker's
messages and the metrics' labels: they stay as they are whatever the module paths.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import signals
from celery.exceptions import Ignore

from instructloop.training.loop import metrics
from instructloop.training.loop.celery_app import TICK_TASK, app, loop_config
from instructloop.training.loop.config import STEPS, CycleConfig
from instructloop.training.loop.heartbeat import lease_ttl
from instructloop.training.loop.runner import run_step
from instructloop.training.loop.store import CycleBusy, CycleStore, redis_client
from instructloop.training.loop.triggers import (
    STEP_TASK_PREFIX,
    due_trigger,
    on_task_revoked,
    resume_stalled,
    start_cycle,
)


def _run(step: str, cycle_id: str, token: int) -> dict[str, Any]:
    cfg = loop_config()
    with redis_client(cfg.redis_url) as client:
        res = run_step(
            step,
            cycle_id,
            token,
            client=client,
            redis_url=cfg.redis_url,
            prefix=cfg.key_prefix,
            lock_ttl_s=cfg.lock_ttl_s,
            heartbeat_s=cfg.heartbeat_s,
            step_time_limit_s=cfg.step_time_limit_s,
            step_niceness=cfg.step_niceness,
            yield_to_serving=cfg.yield_to_serving,
        )
    if res.status == "stopped":
        raise Ignore(res.detail)
    return {"cycle_id": cycle_id, "step": step, "status": res.status}


@app.task(name="training.cycle.snapshot")
def snapshot(cycle_id: str, token: int) -> dict[str, Any]:
    return _run("snapshot", cycle_id, token)


@app.task(name="training.cycle.reward_model")
def reward_model(cycle_id: str, token: int) -> dict[str, Any]:
    return _run("reward_model", cycle_id, token)


@app.task(name="training.cycle.ppo")
def ppo(cycle_id: str, token: int) -> dict[str, Any]:
    return _run("ppo", cycle_id, token)


@app.task(name="training.cycle.evaluate")
def evaluate(cycle_id: str, token: int) -> dict[str, Any]:
    return _run("evaluate", cycle_id, token)


@app.task(name="training.cycle.gate")
def gate(cycle_id: str, token: int) -> dict[str, Any]:
    return _run("gate", cycle_id, token)


@app.task(name="training.cycle.promote")
def promote(cycle_id: str, token: int) -> dict[str, Any]:
    return _run("promote", cycle_id, token)


@app.task(name=TICK_TASK)
def tick(
    every_s: float = 3600.0,
    threshold: int = 0,
    min_new: int = 1,
    cycle_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Beat's periodic check: resume a cycle whose worker died; else start a cycle if the
    schedule or the threshold says so."""
    cfg = loop_config()
    with redis_client(cfg.redis_url) as client:
        store = CycleStore(client, cfg.key_prefix, cfg.lock_ttl_s)
        resumed = resume_stalled(app, store, cfg.queue)
        if resumed:
            return {"result": "resumed", "cycle_id": resumed}
        if store.lock.holder() is not None:
            return {"result": "busy"}
        kind = due_trigger(store, every_s=every_s, threshold=threshold, min_new=min_new)
        if kind is None:
            return {"result": "not_due"}
        try:
            started = start_cycle(
                app,
                client,
                prefix=cfg.key_prefix,
                queue=cfg.queue,
                lock_ttl_s=cfg.lock_ttl_s,
                cfg=CycleConfig.from_dict(cycle_config or {}),
                trigger=kind,
            )
        except CycleBusy:
            metrics.trigger(kind, "busy")
            return {"result": "busy"}
    return {"result": "started", "trigger": kind, "cycle_id": started.cycle_id}


@signals.task_revoked.connect
def _cycle_step_revoked(request: Any = None, **_kw: Any) -> None:
    """A revoked step task (`cycle cancel`) was dropped: the chain stops, so end the cycle."""
    name = getattr(request, "task_name", "") or ""
    step = name.rpartition(".")[2]
    if not name.startswith(STEP_TASK_PREFIX) or step not in STEPS:
        return
    args = list(getattr(request, "args", None) or [])
    if len(args) != 2:
        return
    cfg = loop_config()
    with redis_client(cfg.redis_url) as client:
        on_task_revoked(CycleStore(client, cfg.key_prefix, cfg.lock_ttl_s), args[0], args[1], step)


def _reap_once() -> None:
    cfg = loop_config()
    with redis_client(cfg.redis_url) as client:
        cid = resume_stalled(app, CycleStore(client, cfg.key_prefix, cfg.lock_ttl_s), cfg.queue)
    if cid:
        print(f"instructloop worker: resumed cycle {cid} (its step's worker had died)", flush=True)


def _reaper() -> None:
    period = lease_ttl(loop_config().heartbeat_s)
    while True:
        try:
            _reap_once()
        except Exception as e:  # Redis blip: try again next period
            print(f"instructloop worker: stalled-cycle check failed: {e}", flush=True)
        time.sleep(period)


@signals.worker_ready.connect
def _start_reaper(**_kw: Any) -> None:
    """Every worker watches for a cycle whose step's execution died (lease expired, no output)
    and resumes it: at start (a restarted worker picks up its own crashed cycle) and then every
    lease period (another worker picks it up)."""
    threading.Thread(target=_reaper, name="instructloop-reaper", daemon=True).start()
