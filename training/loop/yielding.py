"""Serving first: a heavy step pauses while a server on this machine has requests in flight.

A lower CPU priority alone does not hold serving's latency on a small machine: the step still
runs on the other hyperthread of the core, on the memory bus and in the caches that a request's
prefill needs. So the step's supervisor (supervise.py) stops the step's whole process group
(SIGSTOP: the stage and the vLLM engine it started) as soon as a replica computing on one of the
step's cores reports a request in flight (instructloop/activity.py), and continues it (SIGCONT)
once serving has been quiet for `HOLDOFF_S`. Training takes the gaps.

Two bounds keep training alive under traffic that never stops: after `MAX_PAUSE_S` paused in a
row the step runs for `MIN_RUN_S` whatever serving does, so it keeps some share of the machine
and its engine's internal time-outs never see a long silence.

A paused group whose supervisor dies stays stopped (a stopped process does not act on the
SIGTERM its parent's death sends it), so each pause is recorded in `<data dir>/activity/paused/`,
and the next heavy step on this machine kills what a dead supervisor left there (`reap_orphans`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from instructloop.activity import activity_dir, serving_busy
from instructloop.hardware import engine_cores
from instructloop.processes import pid_alive

POLL_S = 0.02
"""How often the supervisor looks at serving's activity: a request's prefill waits at most this
long for the step to stop."""
HOLDOFF_S = 0.5
"""Serving quiet this long before the step goes on: clients that send requests back to back
leave shorter gaps, and each stop and continue costs the step its caches."""
MAX_PAUSE_S = 20.0
"""The longest the step stays paused in a row."""
MIN_RUN_S = 2.0
"""How long the step then runs, busy serving or not."""


def paused_dir() -> Path:
    return activity_dir() / "paused"


class ServingFirst:
    """Pauses and continues one process group (the step's) as serving's activity says."""

    def __init__(
        self,
        pgid: int,
        *,
        busy: Callable[[], bool] | None = None,
        holdoff_s: float = HOLDOFF_S,
        max_pause_s: float = MAX_PAUSE_S,
        min_run_s: float = MIN_RUN_S,
    ) -> None:
        self.pgid = pgid
        # The step inherits its supervisor's affinity: only replicas on those cores compete.
        cores = engine_cores(None)
        self._busy = busy or (lambda: serving_busy(holdoff_s=holdoff_s, cores=cores))
        self.max_pause_s, self.min_run_s = max_pause_s, min_run_s
        self.paused = False
        self.pauses = 0
        self.paused_s = 0.0
        """Time the step spent paused so far (closed pauses)."""
        self._since = time.monotonic()  # start of the current pause or run
        self._must_run_until = 0.0
        self._record = paused_dir() / str(pgid)

    def tick(self, now: float | None = None) -> None:
        """Pause or continue the step once, as serving's activity and the bounds say."""
        now = time.monotonic() if now is None else now
        if self.paused:
            if now - self._since >= self.max_pause_s:
                self._resume(now)
                self._must_run_until = now + self.min_run_s
            elif not self._busy():
                self._resume(now)
        elif now >= self._must_run_until and self._busy():
            self._pause(now)

    def paused_total_s(self, now: float | None = None) -> float:
        """Time paused, the current pause included."""
        now = time.monotonic() if now is None else now
        return self.paused_s + (now - self._since if self.paused else 0.0)

    def release(self) -> None:
        """Continue the step for good (before it is stopped or when it ends)."""
        if self.paused:
            self._resume(time.monotonic())

    def _pause(self, now: float) -> None:
        with contextlib.suppress(OSError):
            self._record.parent.mkdir(parents=True, exist_ok=True)
            self._record.write_text(str(os.getpid()))
        try:
            os.killpg(self.pgid, signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            self._record.unlink(missing_ok=True)
            return
        self.paused, self._since = True, now
        self.pauses += 1

    def _resume(self, now: float) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGCONT)
        self.paused_s += now - self._since
        self.paused, self._since = False, now
        self._record.unlink(missing_ok=True)


def reap_orphans(child_module: str) -> list[int]:
    """Kill the paused step groups whose supervisor died; the groups killed.

    Only a group whose leader still runs `child_module` is touched: a recorded pgid may have
    been reused by an unrelated process since.
    """
    killed = []
    try:
        records = list(paused_dir().iterdir())
    except OSError:
        return killed
    for rec in records:
        try:
            pgid, supervisor = int(rec.name), int(rec.read_text() or 0)
        except (OSError, ValueError):
            continue
        if supervisor and pid_alive(supervisor):
            continue
        try:
            cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            cmdline = b""
        if child_module.encode() in cmdline:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
            killed.append(pgid)
        rec.unlink(missing_ok=True)
    return killed
