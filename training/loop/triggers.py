"""Starting, resuming and cancelling cycles.

A cycle starts by hand (`cycle run`), on the beat's schedule or at a threshold of new feedback
(`due_trigger`). Starting takes the cycle lock and sends the cycle's steps as a Celery chain of
tasks named `training.cycle.<step>` (tasks.py). A cycle whose step's execution died is resumed
from that step (`resume_stalled`); `cancel_cycle` stops one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import chain

from instructloop.training.loop import metrics
from instructloop.training.loop.config import STEPS, CycleConfig
from instructloop.training.loop.runner import end_cycle
from instructloop.training.loop.store import (
    TERMINAL,
    CycleBusy,
    CycleStore,
    new_cycle_id,
    text,
)

STEP_TASK_PREFIX = "training.cycle."
"""Celery task names of the steps: `training.cycle.<step>` (wire names: keep them)."""


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
    store = CycleStore(client, prefix, lock_ttl_s)
    cycle_id = new_cycle_id()
    token = store.lock.acquire(cycle_id)
    if token is None:
        metrics.trigger(trigger, "busy")
        raise CycleBusy(store.lock.holder())
    store.create(cycle_id, token, trigger, cfg)
    try:
        task_ids = _send_chain(app, store, cycle_id, token, STEPS, queue)
    except Exception as e:
        rec = store.get(cycle_id)
        assert rec is not None
        reason = f"could not send the cycle's tasks: {e}"
        end_cycle(store, rec, "failed", reason, "start", type(e).__name__)
        raise
    metrics.trigger(trigger, "started")
    return CycleStart(cycle_id, token, task_ids)


def _send_chain(
    app: Any, store: CycleStore, cycle_id: str, token: int, steps: tuple[str, ...], queue: str
) -> list[str]:
    """Send `steps` as a Celery chain; their task ids are added to the record first (for
    `cycle cancel`)."""
    sigs = [
        app.signature(f"{STEP_TASK_PREFIX}{s}", args=(cycle_id, token), immutable=True, queue=queue)
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
    claim = store.keys.resume(rec.id, step, st.get("attempts", 0))
    if not store.client.set(claim, time.time(), nx=True, ex=7 * 86400):
        return None
    store.set_step_state(rec.id, step, {**st, "state": "interrupted"})
    _send_chain(app, store, rec.id, rec.token, STEPS[STEPS.index(step) :], queue)
    metrics.trigger("resume", "started")
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
        last = float(text(store.client.get(anchor_key) or now))
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
            metrics.cycle_finished("cancelled")
        store.lock.release(rec.holder)
        store.client.delete(store.keys.cancel(cycle_id))
    cur = store.get(cycle_id)
    return cur.state if cur else "unknown"


def on_task_revoked(store: CycleStore, cycle_id: str, token: int, step: str) -> None:
    """A worker dropped a revoked step task: the chain stops here, so end the cycle."""
    rec = store.get(cycle_id)
    if rec is None or rec.state in TERMINAL or rec.token != int(token):
        return
    end_cycle(store, rec, "cancelled", "cancelled by request", step)
