"""A heavy step (reward model, PPO, evaluation) in a subprocess of its own, and that subprocess.

Why a subprocess: it can be stopped on cancel or time-out, its memory is returned when it ends,
and a crash in native code fails the step instead of the worker. The parent (`run_heavy`)
starts `python -m instructloop.training.loop.supervise run-step IN OUT` (or the cycle's
launcher, e.g. torchrun for several GPUs) in a process group of its own, watches it and copies
its progress file to the step's record. While serving on this machine has requests in flight
the parent pauses the step (yielding.py). The child (`main`) lowers its own priority, makes sure
it dies with its parent, calls the stage through `stages.py` and writes {"result"} or {"error"}.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructloop.memory import available_gib
from instructloop.training.loop import stages
from instructloop.training.loop.config import STEP_NICENESS
from instructloop.training.loop.store import CycleError
from instructloop.training.loop.yielding import POLL_S, ServingFirst, reap_orphans
from instructloop.training.progress import PROGRESS_FILE_ENV

OOM_SCORE_ADJ = 1000
"""A heavy step is the kernel OOM killer's first choice (/proc/<pid>/oom_score_adj): if memory
runs out after all, the training step dies (and fails its cycle), never the server."""
NICENESS_ENV = "INSTRUCTLOOP_STEP_NICENESS"
CHILD_MODULE = "instructloop.training.loop.supervise"


@dataclass(frozen=True)
class HeavyRun:
    """What the supervisor needs to know about the step it runs."""

    step: str
    dir: Path
    """The step's own directory: input, result, log and progress files go here."""
    launcher: list[str]
    """Command prefix (CycleConfig.launcher); empty: the worker's Python."""
    niceness: int
    time_limit_s: float
    memory_need_gib: float
    """Free memory the step needs before it starts (0: no check)."""
    check: Callable[[], None]
    """Raises to stop the step (cancelled, lock or lease lost)."""
    publish: Callable[[dict[str, Any]], None]
    """Gets the step's progress whenever its progress file changes."""
    yield_to_serving: bool = True
    """Pause the step while a server on this machine has requests in flight (yielding.py)."""


# --- the parent: start, watch, stop -------------------------------------------------------------


def run_heavy(run: HeavyRun, func: str, **kwargs: Any) -> dict[str, Any]:
    """Run `stages.<func>(**kwargs)` in a subprocess and return its result.

    Stops it when `run.check` raises or the step time limit passes. Its output goes to
    `<dir>/step.log`; an error in it becomes this step's failure reason.
    """
    reap_orphans(CHILD_MODULE)  # a dead supervisor's paused step still holds its memory
    check_memory(run.step, run.memory_need_gib)
    run.dir.mkdir(parents=True, exist_ok=True)
    in_path, out_path, log_path = (run.dir / n for n in ("input.json", "result.json", "step.log"))
    progress_path = run.dir / "progress.json"
    out_path.unlink(missing_ok=True)
    in_path.write_text(json.dumps({"func": func, "kwargs": kwargs}))
    cmd = [*(run.launcher or [sys.executable]), "-m", CHILD_MODULE, "run-step"]
    cmd += [str(in_path), str(out_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env[PROGRESS_FILE_ENV] = str(progress_path)  # the stage's Progress writes it
    env[NICENESS_ENV] = str(run.niceness)
    _load_prctl()
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
        yielder = ServingFirst(proc.pid) if run.yield_to_serving else None
        try:
            seen = _watch(proc, run, progress_path, yielder)
        finally:
            if yielder is not None:
                yielder.release()  # a stopped process would not act on the SIGTERM
            _stop(proc)  # also reaps what it left behind in its group
    _publish_progress(run, progress_path, seen)  # its last word
    result = _read_result(func, proc, out_path, log_path)
    if yielder is not None and isinstance(result.get("metrics"), dict):
        result["metrics"]["paused_for_serving_s"] = round(yielder.paused_s, 1)
        result["metrics"]["pauses_for_serving"] = yielder.pauses
    return result


WATCH_S = 0.5
"""How often the supervisor checks for cancellation and copies the step's progress."""


def _watch(
    proc: subprocess.Popen[bytes],
    run: HeavyRun,
    progress_path: Path,
    yielder: ServingFirst | None,
) -> float:
    """Wait for the subprocess to end while checking for cancellation and the time limit (on
    the time it ran, pauses for serving left out), pausing it while serving is busy; the
    progress file's last seen mtime."""
    start = time.monotonic()
    seen, next_check = 0.0, 0.0
    while proc.poll() is None:
        now = time.monotonic()
        if yielder is not None:
            yielder.tick(now)
        if now >= next_check:
            next_check = now + WATCH_S
            run.check()  # the caller's `finally` stops the subprocess
            paused = yielder.paused_total_s(now) if yielder is not None else 0.0
            if now - start - paused > run.time_limit_s:
                raise CycleError(f"{run.step} ran past the step time limit")
            seen = _publish_progress(run, progress_path, seen)
        time.sleep(POLL_S if yielder is not None else WATCH_S)
    return seen


def _read_result(
    func: str, proc: subprocess.Popen[bytes], out_path: Path, log_path: Path
) -> dict[str, Any]:
    result = json.loads(out_path.read_text()) if out_path.exists() else None
    if result and "error" in result:
        raise CycleError(result["error"])
    if proc.returncode != 0 or result is None:
        tail = log_path.read_text(errors="replace")[-1500:].strip()
        raise CycleError(f"{func} exited with code {proc.returncode}: {tail}")
    return dict(result["result"])


def check_memory(step: str, need: float) -> None:
    """Refuse a heavy step that would not fit in the memory available now (the server's engine
    keeps what it holds; instructloop/memory.py)."""
    if need <= 0:
        return
    free = available_gib()
    if free < need:
        raise CycleError(
            f"not enough memory: the {step} step needs about {need:g} GiB free and "
            f"{free:.1f} GiB is available; not starting it, so serving keeps its memory. Free "
            "memory (a smaller serving KV cache: --kv-cache-space-gib), or lower the need with "
            f'the cycle config\'s step_memory_gib {{"{step}": ...}} if the estimate is high'
        )


def _publish_progress(run: HeavyRun, path: Path, seen: float) -> float:
    """Hand the subprocess's progress file to `run.publish` when it changed; the file's mtime,
    for the next call."""
    try:
        mtime = path.stat().st_mtime
        if mtime <= seen:
            return seen
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return seen
    run.publish(progress)
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
        os.killpg(proc.pid, signal.SIGCONT)  # a paused group must run to act on SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (proc.poll() is None or group_alive()):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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


# --- the child: the step's subprocess -----------------------------------------------------------


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
    """The heavy step's subprocess: call the stage, write {"result"} or {"error"}."""
    _guard_group()
    _lower_priority()
    spec = json.loads(Path(in_path).read_text())
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        result = getattr(stages, spec["func"])(**spec["kwargs"])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {CHILD_MODULE}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rs = sub.add_parser("run-step", help="(internal) run a heavy step's function")
    rs.add_argument("input")
    rs.add_argument("output")
    args = parser.parse_args(argv)
    return _child_main(args.input, args.output)


if __name__ == "__main__":
    sys.exit(main())
