"""One run, phase by phase: `up` as shipped on a fresh data directory, idle TTFT, the held-out
answers before, feedback and a cycle under load (again after a rejected cycle), the held-out
answers after, and `up` stopped."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import machine, progress_log
from benchmarks.online_learning.client import ADMIN_KEY, USER_KEY, Session
from benchmarks.online_learning.config import OnlineLearningConfig
from benchmarks.online_learning.heldout import answers
from benchmarks.online_learning.measures import latency_summary
from benchmarks.online_learning.probes import Probes, idle_ttft, probe_loop
from benchmarks.online_learning.product import (
    EXIT_PROMOTED,
    EXIT_REJECTED,
    UpProcess,
    cli,
    read_oom,
    run_cycle,
    uptime,
)
from benchmarks.online_learning.results import finish
from benchmarks.online_learning.users import collect_feedback, user_traffic
from benchmarks.serving import wait_grpc
from instructloop.redis_server import free_port
from instructloop.running import read_running
from instructloop.training.data.constraints import ConstraintPrompt, generate_prompts

_log = progress_log("online_learning")


@dataclass
class _Run:
    """What every phase of one run needs: the settings, `up` and its environment, and the
    result the phases fill as they go (a failed run keeps what it measured)."""

    cfg: OnlineLearningConfig
    env: dict[str, str]
    work: Path
    up: UpProcess
    result: dict[str, Any]
    t0: float

    def log(self, msg: str) -> None:
        _log(self.t0, msg)


def run(cfg: OnlineLearningConfig) -> dict[str, Any]:
    """One run; the result holds whatever was measured, and `error` when it stopped early."""
    t0 = time.time()
    since_boot = uptime()
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="instructloop-online-")).resolve()
    data = work / "data"
    if data.exists() and any(data.iterdir()):
        raise ValueError(f"{data} is not empty: the run needs a fresh data directory")
    data.mkdir(parents=True, exist_ok=True)
    env = _user_env(data)
    ports = {"grpc": free_port(), "metrics": free_port(), "worker_metrics": free_port()}
    cmd = [
        sys.executable, "-m", "instructloop", "up",
        "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
        "--worker-metrics-port", str(ports["worker_metrics"]), *cfg.up_args,
    ]  # fmt: skip
    result: dict[str, Any] = {
        "benchmark": "online_learning",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "config": dataclasses.asdict(cfg),
        "work_dir": str(work),
        "logs": {"up": str(work / "up.log")},
        "up_command": cmd[1:],
        "seconds": {},
        "error": None,
    }
    _log(t0, f"work dir {work}; starting instructloop up (gRPC port {ports['grpc']})")
    r = _Run(cfg, env, work, UpProcess(cmd, env, work / "up.log"), result, t0)
    try:
        address = _wait_up(r, data)
        asyncio.run(_session(r, address))
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        r.log(f"stopped: {result['error']}")
        if not isinstance(e, Exception | KeyboardInterrupt):  # Ctrl-C still writes the results
            raise
    finally:
        _stop(r, since_boot)
    return result


def _user_env(data: Path) -> dict[str, str]:
    """As a user's shell would have it, with the benchmark's keys; no REDIS_URL, so `up` starts
    its private Redis and every other verb finds the loop through `up`'s record."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        INSTRUCTLOOP_DATA_DIR=str(data),
        INSTRUCTLOOP_API_KEYS=USER_KEY,
        INSTRUCTLOOP_ADMIN_KEYS=ADMIN_KEY,
    )
    return env


def _wait_up(r: _Run, data: Path) -> str:
    """Wait for `up`'s record and its gRPC port; the address it serves at."""
    cfg, up = r.cfg, r.up
    t = time.time()
    deadline = time.monotonic() + cfg.startup_timeout_s
    loop = None
    while loop is None:
        if not up.alive():
            raise RuntimeError(f"instructloop up exited ({up.proc.returncode}):\n{up.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no record of `up` after {cfg.startup_timeout_s} s")
        loop = read_running(data)
        if loop is None:
            time.sleep(1.0)
    r.result["running"] = dataclasses.asdict(loop)
    port = int(loop.grpc.rpartition(":")[2])
    wait_grpc(port, up, timeout=max(1.0, deadline - time.monotonic()))  # type: ignore[arg-type]
    r.result["seconds"]["startup"] = time.time() - t
    r.log(f"serving at {loop.grpc} after {time.time() - t:.0f} s")
    return str(loop.grpc)


def _stop(r: _Run, since_boot: float | None) -> None:
    """Stop `up` as a user does, record how it went, and finish the result's figures."""
    result = r.result
    if r.up.alive():
        result["status"] = cli(["status"], r.env)
        # A cycle the beat started on its own would share the cores with the measurements.
        result["cycles_listed"] = cli(["cycle", "status", "--list", "10"], r.env)
    result["loadavg_end"] = os.getloadavg()
    t = time.time()
    result["up_exit"] = r.up.stop(r.cfg.stop_timeout_s)
    result["seconds"]["stop"] = time.time() - t
    result["oom"] = read_oom(since_boot)
    finish(result)
    result["seconds"]["total"] = time.time() - r.t0


async def _session(r: _Run, address: str) -> None:
    """Phases 2-6 over one gRPC channel."""
    cfg, result = r.cfg, r.result
    s = Session(address, cfg)
    result["_session"] = s
    phases = result["seconds"]
    try:
        v1 = await s.serving_version()
        result["versions"] = {"before": v1}
        eval_p = generate_prompts(cfg.n_eval_prompts, "heldout", seed=cfg.seed)
        train_p = generate_prompts(cfg.n_train_prompts, "train", seed=cfg.seed)
        result["prompts"] = {"train": len(train_p), "heldout": len(eval_p)}

        t = time.time()
        idle = result["_idle"] = Probes()
        await idle_ttft(s, idle)
        phases["idle_ttft"] = time.time() - t
        r.log(f"idle TTFT p99 {latency_summary(idle.ttfts())['p99_s']}")

        t = time.time()
        traffic = result["_traffic"] = Probes()
        await _traffic_ttft(s, traffic, train_p)
        phases["traffic_ttft"] = time.time() - t
        r.log(f"TTFT p99 beside the users' traffic {latency_summary(traffic.ttfts())['p99_s']}")

        t = time.time()
        before, seen = await answers(s, eval_p, "eval_before")
        phases["eval_before"] = time.time() - t
        result["_answers"] = {"before": before}
        result["eval_versions"] = {"before": dict(seen)}
        r.log(f"{len(before)} held-out answers from {dict(seen)}")

        await _rounds(r, s, train_p, v1)

        t = time.time()
        after, seen = await answers(s, eval_p, "eval_after")
        phases["eval_after"] = time.time() - t
        result["_answers"]["after"] = after
        result["eval_versions"]["after"] = dict(seen)
        result["versions"]["after"] = next(iter(seen)) if len(seen) == 1 else dict(seen)
        result["_eval_prompts"] = eval_p
    finally:
        await s.close()


async def _traffic_ttft(s: Session, traffic: Probes, prompts: list[ConstraintPrompt]) -> None:
    """Probes beside the users' requests, with no cycle: the cycle phase's traffic alone."""
    stop = asyncio.Event()
    users = asyncio.create_task(user_traffic(s, prompts, stop))
    try:
        await probe_loop(s, traffic, "traffic_probe", count=s.cfg.traffic_probes)
    finally:
        stop.set()
        await asyncio.gather(users, return_exceptions=True)


async def _rounds(r: _Run, s: Session, train_p: list[ConstraintPrompt], v1: str) -> None:
    """Feedback, then a cycle under load; after a rejected cycle another round on new training
    prompts, up to max_cycles."""
    cfg, result = r.cfg, r.result
    load = result["_cycle_probes"] = Probes()
    result["cycles"] = []
    result["feedback_rounds"] = []
    for idx in range(cfg.max_cycles):
        prompts = (
            train_p
            if idx == 0
            else generate_prompts(cfg.n_train_prompts, "train", seed=cfg.seed + 1000 * idx)
        )
        r.log(f"round {idx}: {len(prompts)} training prompts, K = {cfg.k}")
        fb = await collect_feedback(s, prompts, f"r{idx}")
        result["feedback_rounds"].append(fb)
        result["first_ranking_at"] = result.get("first_ranking_at") or fb["first_ack_at"]
        result["seconds"][f"feedback_{idx}"] = fb["seconds"]
        r.log(f"{fb['rankings']} rankings sent, {fb['all_tied']} all tied")
        cyc, promoted = await _cycle_under_load(r, s, idx, prompts, v1, load)
        if promoted or cyc["exit_code"] != EXIT_REJECTED:
            break


async def _cycle_under_load(
    r: _Run, s: Session, idx: int, prompts: list[ConstraintPrompt], v1: str, load: Probes
) -> tuple[dict[str, Any], str | None]:
    """`cycle run --wait` while the probes and the users' requests go on; after a promotion,
    until the promoted version serves. The cycle's record and the version then served."""
    result = r.result
    promoted: str | None = None
    stop = asyncio.Event()
    bg = [
        asyncio.create_task(probe_loop(s, load, "cycle_probe", stop=stop)),
        asyncio.create_task(user_traffic(s, prompts, stop)),
    ]
    t = time.time()
    try:
        r.log("cycle run --wait")
        cyc = await run_cycle(r.cfg, r.env, r.work, idx, r.up)
        result["cycles"].append(cyc)
        r.log(f"cycle {cyc.get('id')}: {cyc.get('state')} (exit {cyc['exit_code']})")
        if cyc["exit_code"] == EXIT_PROMOTED:
            promoted = await _wait_promoted(r, s, cyc, v1)
    finally:
        stop.set()
        got = await asyncio.gather(*bg, return_exceptions=True)
        result["seconds"][f"cycle_{idx}"] = time.time() - t
    result.setdefault("cycle_user_requests", 0)
    result["cycle_user_requests"] += got[1] if isinstance(got[1], int) else 0
    return cyc, promoted


async def _wait_promoted(r: _Run, s: Session, cyc: dict[str, Any], v1: str) -> str:
    """Until the promoted version serves, then the swap's aftermath; the version served."""
    cfg, result = r.cfg, r.result
    served_at = await s.wait_serving(cyc.get("candidate_version") or None, v1, cfg.served_timeout_s)
    promoted = await s.serving_version()
    first_ack = result.get("first_ranking_at")
    if first_ack is not None:
        result["first_ranking_to_served_s"] = served_at - first_ack
    if cyc.get("promoted_at"):
        result["promotion_to_served_s"] = served_at - cyc["promoted_at"]
    await asyncio.sleep(cfg.settle_after_served_s)
    return promoted
