"""`instructloop worker` as a real process of the loop's tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from instructloop.redis_server import free_port
from instructloop.training.loop.supervise import _die_with_parent
from tests.support.loop import REPO, loop_env


@dataclass
class WorkerProc:
    """`instructloop worker` in its own process group (so a kill takes its children too)."""

    redis_url: str
    log_path: Path
    pool: str = "prefork"
    metrics_port: int = field(default_factory=free_port)
    cpus: set[int] | None = None
    """Run the worker (and every training step it starts) on these CPUs only, as on a machine
    of its own (its vLLM engines bound there too)."""
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> WorkerProc:
        """Start the worker and wait until its log says it is ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        name = f"test-{uuid.uuid4().hex[:6]}@%h"
        cmd = [
            sys.executable, "-m", "instructloop", "worker",
            "--pool", self.pool, "--metrics-port", str(self.metrics_port),
            "--hostname", name, "--loglevel", "INFO",
        ]  # fmt: skip
        env = loop_env(self.redis_url)
        cpus = self.cpus
        if cpus is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cpus)))
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"

        def preexec() -> None:
            _die_with_parent()  # a killed test run leaves no worker taking tasks
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if " ready." in text:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{text[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process, pool child, step subprocess)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM the whole worker; SIGKILL it if it has not exited within 30 s."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass
        self.proc = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            return str(r.read().decode())
