"""The schedule's process: one active beat at a time, ticking the loop's queue.

The beat runs only while it holds a Redis lock (BeatLock); a second one waits as a hot standby.
Every `tick_s` it sends a tick task that starts a cycle when `every_s` have passed since the last
one, or `threshold` new rankings/comparisons arrived since the last reward model
(triggers.due_trigger). The schedule is also written to Redis, so that `instructloop status` can
say when the next cycle is due.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

from instructloop.feedback.keys import LoopKeys
from instructloop.training.loop.config import CycleConfig, LoopConfig
from instructloop.training.loop.locks import BeatLock
from instructloop.training.loop.store import redis_client


@dataclass(frozen=True)
class Schedule:
    every_s: float
    """Start a cycle this long after the last one (0: off)."""
    threshold: int
    """Start one when this many new rankings and comparisons arrived (0: off)."""
    min_new: int
    """New feedback a scheduled cycle needs; without it the period passes without a cycle."""
    tick_s: float
    """How often the beat checks."""


class AnotherBeat(Exception):
    """Another beat holds the lock and this one was told not to wait."""


def _log(msg: str) -> None:
    print(f"instructloop beat: {msg}", file=sys.stderr, flush=True)


def run_beat(
    cfg: LoopConfig, schedule: Schedule, cycle_cfg: CycleConfig, *, wait: bool, loglevel: str
) -> None:
    """Hold the beat lock (waiting for it when `wait`), then tick until stopped."""
    from celery.apps.beat import Beat

    from instructloop.training.loop.celery_app import TICK_TASK, LockedScheduler, app

    keys = LoopKeys(cfg.key_prefix)
    with redis_client(cfg.redis_url) as client:
        lock = BeatLock(client, keys.beat, cfg.beat_lock_ttl_s)
        if not lock.acquire():
            holder = lock.holder()
            if not wait:
                raise AnotherBeat(f"another beat is active ({holder}); only one beat may run")
            _log(f"another beat is active ({holder}); waiting as standby")
            lock.wait_acquire(poll_s=max(1.0, cfg.beat_lock_ttl_s / 3))
        _log(f"active ({lock.owner})")
        client.set(keys.schedule, json.dumps({**asdict(schedule), "beat": lock.owner}))
        try:
            kwargs = {k: v for k, v in asdict(schedule).items() if k != "tick_s"}
            app.conf.beat_schedule = {
                "instructloop-cycle-tick": {
                    "task": TICK_TASK,
                    "schedule": schedule.tick_s,
                    "kwargs": {**kwargs, "cycle_config": cycle_cfg.to_dict()},
                    # A tick that waited in the queue behind a long step is stale.
                    "options": {"queue": cfg.queue, "expires": schedule.tick_s},
                }
            }
            LockedScheduler.beat_lock = lock
            Beat(
                app=app,
                scheduler=f"{LockedScheduler.__module__}:LockedScheduler",
                max_interval=max(1, cfg.beat_lock_ttl_s // 3),
                loglevel=loglevel,
            ).run()
        finally:
            try:
                lock.release()
            except Exception as e:  # Redis gone: the TTL ends the lock
                _log(f"could not release the lock: {e}")
