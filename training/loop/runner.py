"""Running one step of a cycle (what each Celery task does), and ending a cycle.

`run_step` wraps a step (steps.py) with everything that makes the cycle safe to run on Celery:

- Idempotent. A step's output is stored in the cycle record in Redis under the cycle id
  (`out:<step>`); a step whose output is there is not run again (a redelivered message after a
  worker crash skips the finished steps and redoes only the interrupted one). Files go under
  `<work_dir>/<cycle id>/<step>/`, and an interrupted step's partial files are removed first.
- Fenced. The cycle holds the cycle lock with a fencing token (locks.py). The output, the "last
  reward model" pointer and the promotion are written only while the token is still current,
  so a stale holder cannot publish anything, promote included.
- Cancellable. `cycle cancel` sets a flag; it is checked before each step, every heartbeat while
  a heavy step runs (the step's subprocess is then stopped) and before a step's result is written.
- Safe on failure. Nothing reaches the registry's live pointer except the promote step, after the
  gate passed; any failure ends the cycle with state "failed", the step and the reason in the
  cycle record, and counts it in the metrics. The serving model is untouched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from instructloop.training.loop import metrics
from instructloop.training.loop.config import STEP_NICENESS, STEPS, CycleConfig
from instructloop.training.loop.heartbeat import Heartbeat, lease_ttl
from instructloop.training.loop.locks import Holder, Lease, LockLost
from instructloop.training.loop.steps import STEP_FUNCS, StepContext, StepResult
from instructloop.training.loop.store import (
    TERMINAL,
    Cancelled,
    CycleError,
    CycleRecord,
    CycleStore,
    LeaseLost,
    encode,
)


@dataclass
class StepRun:
    """How `run_step` ended: "done" (continue the chain), "skipped" (the output was there:
    continue the chain), or "stopped" (the cycle ended or another execution owns the step:
    do not continue)."""

    status: str
    detail: str = ""


@dataclass
class _Attempt:
    """One execution of a step: its settings, directory and clocks."""

    step: str
    rec: CycleRecord
    config: CycleConfig
    number: int
    dir: Path
    started: float
    t0: float


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
    yield_to_serving: bool = True,
) -> StepRun:
    """Run one step of a cycle idempotently, fenced and cancellable (see module docstring).

    Raises CycleError after recording a failure (so Celery marks the task failed and the chain
    stops); returns a StepRun otherwise.
    """
    if step not in STEP_FUNCS:
        raise ValueError(f"unknown step {step!r}")
    store = CycleStore(client, prefix, lock_ttl_s)
    holder = Holder(cycle_id, int(token))
    rec = store.get(cycle_id)
    if rec is None:
        return StepRun("stopped", f"no cycle record {cycle_id}")
    ended = _preflight(store, rec, holder, step)
    if ended is not None:
        return ended
    lease = Lease(client, store.keys.lease(cycle_id, step), lease_ttl(heartbeat_s))
    if not lease.acquire():
        return StepRun("stopped", "another execution holds this step's lease")
    attempt = _start_attempt(store, rec, step)
    try:
        with Heartbeat(store, holder, lease, heartbeat_s) as hb:
            ctx = StepContext(
                cycle_id=cycle_id,
                step=step,
                config=attempt.config,
                redis_url=redis_url,
                prefix=prefix,
                store=store,
                holder=holder,
                dir=attempt.dir,
                outputs={s: store.output(cycle_id, s) or {} for s in STEPS[: STEPS.index(step)]},
                heartbeat=hb,
                step_time_limit_s=step_time_limit_s,
                niceness=step_niceness,
                yield_to_serving=yield_to_serving,
            )
            result = STEP_FUNCS[step](ctx)
            hb.check()
            _write_result(store, holder, lease, attempt, result)
    except LeaseLost as e:
        return StepRun("stopped", str(e))  # the step and the cycle belong to the other one
    except Exception as e:
        return _failed(store, lease, attempt, e)
    finally:
        with contextlib.suppress(redis.RedisError):
            lease.release()
    _done(store, attempt, result)
    return StepRun("done")


def _done(store: CycleStore, attempt: _Attempt, result: StepResult) -> None:
    """Count a finished step, export its figures, and end the cycle after its last step."""
    step = attempt.step
    metrics.step_finished(step, "done", time.monotonic() - attempt.t0)
    metrics.training_metrics(step, result.summary)
    if step == "gate":
        metrics.gate_results(result.output["checks"])
    if step == STEPS[-1]:
        finish_cycle(store, attempt.rec)


def _preflight(store: CycleStore, rec: CycleRecord, holder: Holder, step: str) -> StepRun | None:
    """Whether this step should run at all: a StepRun when it should not (the cycle ended, was
    cancelled or fenced out, or the step's output is already there), else None."""
    if rec.state in TERMINAL:
        return StepRun("stopped", f"cycle already {rec.state}")
    if rec.token != holder.token:
        return StepRun("stopped", "token does not match the cycle record")
    if store.cancel_requested(rec.id):
        end_cycle(store, rec, "cancelled", "cancelled by request", step)
        return StepRun("stopped", "cancelled")
    if not store.lock.renew(holder):
        cur = store.lock.holder()
        reason = f"fenced out: the cycle lock is held by {cur.value if cur else 'nobody'}"
        end_cycle(store, rec, "failed", reason, step, error="LockLost")
        return StepRun("stopped", reason)
    if store.output(rec.id, step) is not None:
        if step == STEPS[-1]:
            finish_cycle(store, rec)
        return StepRun("skipped", "output already recorded")
    missing = [s for s in STEPS[: STEPS.index(step)] if store.output(rec.id, s) is None]
    if missing:
        reason = f"{step}: earlier step(s) {', '.join(missing)} have no output"
        end_cycle(store, rec, "failed", reason, step, error="CycleError")
        raise CycleError(reason)
    return None


def _start_attempt(store: CycleStore, rec: CycleRecord, step: str) -> _Attempt:
    """Count the attempt, give it a fresh directory and mark the step running."""
    cfg = CycleConfig.from_dict(rec.config)
    number = int(store.step_state(rec.id, step).get("attempts", 0)) + 1
    # Each execution writes into its own directory; an interrupted one's partial files go.
    step_root = Path(cfg.work_dir) / rec.id / step
    if step_root.exists():
        for old in step_root.iterdir():
            shutil.rmtree(old, ignore_errors=True)
    step_dir = step_root / f"attempt-{number}"
    step_dir.mkdir(parents=True)
    started = time.time()
    store.set_step_state(
        rec.id, step, {"state": "running", "started_at": started, "attempts": number}
    )
    store.set_fields(rec.id, state="running", current_step=step)
    return _Attempt(step, rec, cfg, number, step_dir, started, time.monotonic())


def _write_result(
    store: CycleStore, holder: Holder, lease: Lease, attempt: _Attempt, result: StepResult
) -> None:
    """Write the step's output, its record and the result's other hashes in one fenced write:
    only while this cycle holds the lock AND this execution holds the step."""
    step, cycle_id = attempt.step, attempt.rec.id
    extra: dict[str, Any] = {}
    if step == "snapshot":
        extra["parent_version"] = result.output["parent_version"]
    if step == "gate":
        extra["candidate_version"] = result.output["version"]
    done = {
        "state": "done",
        "started_at": attempt.started,
        "finished_at": time.time(),
        "seconds": round(time.monotonic() - attempt.t0, 3),
        "attempts": attempt.number,
        "summary": result.summary,
    }
    last_progress = store.step_state(cycle_id, step).get("progress")
    if last_progress:
        done["progress"] = last_progress  # how far it got: the whole run, normally
    writes = {
        store.keys.cycle(cycle_id): {
            f"out:{step}": json.dumps(result.output),
            f"step:{step}": json.dumps(done),
            **{k: encode(v) for k, v in extra.items()},
        },
        **{k: {f: encode(v) for f, v in m.items()} for k, m in result.writes.items()},
    }
    status = store.lock.fenced_write(holder, writes, require={lease.key: lease.owner})
    if status == "requirement_failed":
        raise LeaseLost(f"another execution took over {lease.key}")
    if status != "ok":
        raise LockLost(f"cycle {cycle_id} lost the cycle lock before writing {step}")


def _failed(store: CycleStore, lease: Lease, attempt: _Attempt, e: Exception) -> StepRun:
    """Record how the step ended on `e` and end the cycle; raises CycleError for a failure."""
    step, rec = attempt.step, attempt.rec
    if not _still_owner(lease):
        return StepRun("stopped", f"{step} was taken over by another execution")
    if isinstance(e, Cancelled):
        _step_ended(store, attempt, "cancelled")
        end_cycle(store, rec, "cancelled", "cancelled by request", step)
        return StepRun("stopped", "cancelled")
    if isinstance(e, LockLost):
        _step_ended(store, attempt, "failed", str(e))
        end_cycle(store, rec, "failed", f"fenced out: {e}", step, error="LockLost")
        return StepRun("stopped", str(e))
    reason = f"{step}: {e}" if isinstance(e, CycleError) else f"{step}: {type(e).__name__}: {e}"
    _step_ended(store, attempt, "failed", reason)
    end_cycle(store, rec, "failed", reason, step, error=type(e).__name__)
    raise CycleError(reason) from e


def _still_owner(lease: Lease) -> bool:
    try:
        return lease.renew()
    except redis.RedisError:
        return True  # cannot tell: record the failure (the cycle ends either way)


def _step_ended(store: CycleStore, attempt: _Attempt, state: str, error: str = "") -> None:
    seconds = time.monotonic() - attempt.t0
    entry = {
        "state": state,
        "started_at": attempt.started,
        "finished_at": time.time(),
        "seconds": round(seconds, 3),
        "attempts": attempt.number,
    }
    if error:
        entry["error"] = error
    store.set_step_state(attempt.rec.id, attempt.step, entry)
    metrics.step_finished(attempt.step, state, seconds)


def end_cycle(
    store: CycleStore,
    rec: CycleRecord,
    state: str,
    reason: str,
    step: str,
    error: str | None = None,
) -> None:
    """Finalize (once), release the lock if still ours, count it."""
    extra = {"failed_step": step} if state == "failed" else {}
    if store.finalize(rec.id, state, reason, **extra):
        metrics.cycle_finished(state, step, error)
    store.lock.release(rec.holder)
    store.client.delete(store.keys.cancel(rec.id))


def finish_cycle(store: CycleStore, rec: CycleRecord) -> None:
    """End a cycle whose promote step ran: promoted, or rejected with the failed checks."""
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
    end_cycle(store, rec, state, reason, "promote")
