"""The heartbeat of a running step: it keeps the cycle lock and the step's lease alive and
watches the cancel flag, so a step can be stopped between pieces of work."""

from __future__ import annotations

import contextlib
import threading

import redis

from instructloop.training.loop.locks import Holder, Lease, LockLost
from instructloop.training.loop.store import Cancelled, CycleStore, LeaseLost


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


def lease_ttl(heartbeat_s: float) -> float:
    """A step's lease outlives six missed heartbeats: a busy machine does not lose it, a dead
    execution is noticed within seconds."""
    return 6 * heartbeat_s
