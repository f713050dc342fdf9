"""The product as a user runs it: `instructloop up` in a process group of its own, the CLI's
other verbs (`cycle run --wait`, `status`), and the kernel log's OOM kills."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO
from benchmarks.online_learning.config import OnlineLearningConfig
from benchmarks.online_learning.measures import cycle_summary, oom_lines

# Exit codes of `instructloop cycle run --wait`.
EXIT_PROMOTED, EXIT_FAILED, EXIT_REJECTED = 0, 1, 3


class UpProcess:
    """`instructloop up` in a process group of its own, its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        with log.open("wb") as f:  # the child holds its own descriptor
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGINT, as Ctrl-C: `up` stops the worker, beat and Redis itself. What it leaves of
        its process group, or a hang past `timeout`, is recorded, then killed."""
        t = time.monotonic()
        out: dict[str, Any] = {"exit_code": self.proc.poll(), "forced": False, "leftovers": False}
        if out["exit_code"] is None:
            os.kill(self.pid, signal.SIGINT)
            try:
                out["exit_code"] = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                out["forced"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
                out["exit_code"] = self.proc.returncode
        out["seconds"] = time.monotonic() - t
        # Its children (Redis, the engine, worker, beat) share the group: any left must go.
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.group_alive():
            out["leftovers"] = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
                time.sleep(5)
                os.killpg(self.pid, signal.SIGKILL)
        return out


def uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_oom(since_uptime_s: float | None) -> dict[str, Any]:
    try:
        p = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"lines": None, "note": f"dmesg not run: {e}"}
    if p.returncode != 0:
        return {"lines": None, "note": f"dmesg exit {p.returncode}: {p.stderr.strip()[:200]}"}
    return {"lines": oom_lines(p.stdout, since_uptime_s or 0.0), "note": ""}


def cli(args: list[str], env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    try:
        p = subprocess.run(
            [sys.executable, "-m", "instructloop", *args],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        return {"exit_code": None, "stdout": str(e.stdout or ""), "stderr": f"timed out: {e}"}
    return {"exit_code": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


async def run_cycle(
    cfg: OnlineLearningConfig, env: dict[str, str], work: Path, idx: int, up: UpProcess
) -> dict[str, Any]:
    """`instructloop cycle run --wait` as a user runs it; then its record."""
    cmd = [sys.executable, "-m", "instructloop", "cycle", "run", "--wait",
           "--timeout", str(cfg.cycle_timeout_s)]  # fmt: skip
    if cfg.cycle_config:
        path = work / "cycle-config.json"
        path.write_text(json.dumps(cfg.cycle_config, indent=1))
        cmd += ["--config", str(path)]
    log = work / f"cycle-{idx}.log"
    t = time.time()
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=err
        )
        comm = asyncio.ensure_future(proc.communicate())
        while True:
            done, _ = await asyncio.wait({comm}, timeout=5)
            if done:
                break
            if not up.alive():  # nothing will finish the cycle now
                proc.kill()
                await comm
                raise RuntimeError(f"instructloop up exited during the cycle:\n{up.tail()}")
        out, _ = comm.result()
    stdout = out.decode(errors="replace")
    with log.open("a") as f:
        f.write(f"\n--- stdout\n{stdout}")
    # `cycle run` prints the id first (cyc-...); anything else on stdout is not the id.
    cycle_id = next((ln.strip() for ln in stdout.splitlines() if ln.startswith("cyc-")), "")
    res: dict[str, Any] = {"exit_code": proc.returncode, "wall_s": time.time() - t, "log": str(log)}
    if cycle_id:
        st = await asyncio.to_thread(cli, ["cycle", "status", cycle_id, "--json"], env)
        try:
            res.update(cycle_summary(json.loads(st["stdout"])))
        except ValueError:
            res["status_error"] = (st["stdout"] + st["stderr"])[-2000:]
    return res
