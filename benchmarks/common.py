"""Shared helpers for the benchmarks: process management, percentiles, result files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

C = TypeVar("C")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    from instructloop.hardware import cpu_flags

    # One CPU model name covers parts from AVX2-only to AVX512-BF16, which differ several-fold
    # in bf16 work: record the units that decide it.
    bf16_units = sorted({"avx512_bf16", "amx_bf16", "avx2"} & cpu_flags())
    return {
        "cpu": cpu,
        "cpu_units": bf16_units,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        # Other work on the machine skews every figure; record how busy it was.
        "loadavg_1m": os.getloadavg()[0],
    }


def torch_machine(**extra: Any) -> dict[str, Any]:
    """The platform, CPU count, torch build and GPU of a benchmark that trains, and `extra`."""
    import torch  # heavy: only the training benchmarks call this

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    }


def write_results(name: str, payload: dict[str, object], markdown: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    return out


class Proc:
    """A child process in its own process group, stopped with everything it spawned."""

    def __init__(self, cmd: list[str], *, env: dict[str, str] | None = None, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def cpu_seconds(pid: int, part: Literal["all", "self", "children"] = "all") -> float:
    """User + system CPU seconds used so far by a process ("self"), by its descendants
    ("children": a server's vLLM engine core) or by both ("all"). Descendants that exit while
    being read count 0. Reads /proc through psutil (a dependency of vLLM)."""
    import psutil

    proc = psutil.Process(pid)
    procs = [] if part == "children" else [proc]
    if part != "self":
        procs += proc.children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def python() -> str:
    return sys.executable


def fresh_redis(name: str) -> Any:
    """A private durable redis-server (AOF, appendfsync always) on an empty directory of its own:
    nothing from an earlier run (whose AOF would be replayed) leaks into this one."""
    import shutil

    from instructloop.redis_server import RedisProcess

    d = RESULTS_DIR / "tmp" / name
    shutil.rmtree(d, ignore_errors=True)
    return RedisProcess(dir=d).start()


def progress_log(name: str) -> Callable[[float, str], None]:
    """A log to stderr whose lines carry the benchmark's name and the seconds since `t0`."""

    def log(t0: float, msg: str) -> None:
        print(f"[{name} {time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def apply_overrides(cfg: C, items: Sequence[str]) -> C:
    """`key=value` assignments (value as JSON; strings may be bare) into a copy of the dataclass
    `cfg`; dict fields are merged, and an int is taken for a float field. A wrong key or type is
    an error: a typo must not run an hour with the wrong setting ("yes" is truthy, "1e3" a
    str)."""
    assert dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
    known = {f.name for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            name = type(cfg).__name__
            raise ValueError(f"unknown {name} field in {item!r}: not a field of {name}")
        cur = changes.get(key, getattr(cfg, key))
        try:
            value = raw if isinstance(cur, str) else json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(cur, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(cur):
            raise ValueError(f"{key} takes a JSON {type(cur).__name__}, got {raw!r}")
        changes[key] = {**cur, **value} if isinstance(cur, dict) else value
    return dataclasses.replace(cfg, **changes)


def parse_config(
    ap: argparse.ArgumentParser, argv: list[str] | None, cls: type[C], quick: Callable[[C], C]
) -> tuple[argparse.Namespace, C]:
    """Add --quick and the `key=value` overrides to a parser that has --work-dir, parse `argv`,
    and build the config: the defaults with that work dir, the quick sizes if asked, then the
    overrides. A wrong override stops with the parser's usage error."""
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness only")
    ap.add_argument("overrides", nargs="*", help=f"{cls.__name__} fields as key=JSON")
    args = ap.parse_args(argv)
    cfg = cls(work_dir=args.work_dir)  # type: ignore[call-arg]
    if args.quick:
        cfg = quick(cfg)
    try:
        cfg = apply_overrides(cfg, args.overrides)
    except ValueError as e:
        ap.error(str(e))
    return args, cfg


def add_results_name(ap: argparse.ArgumentParser, default: str) -> None:
    """--name: the results file's stem, so that another machine's run is kept beside this one."""
    ap.add_argument(
        "--name",
        default=default,
        help="results file stem under benchmarks/results/ (to keep another machine's run)",
    )
