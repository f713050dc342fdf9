"""`instructloop worker` and `instructloop beat`: the training loop's processes.

- `worker`: a Celery worker on the `training` queue, one task at a time (the Celery app's
  docstring says why), Prometheus metrics on --metrics-port.
- `beat`: the schedule. It runs only while it holds a Redis lock; a second beat waits as a hot
  standby (or exits with --no-wait). Every --tick seconds it sends a tick task that starts a
  cycle when --every seconds have passed since the last one, or --threshold new
  rankings/comparisons arrived since the last reward model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from instructloop.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    add_redis_args,
    err,
    loop_config,
    loop_env,
)


def _worker(args: argparse.Namespace) -> int:
    """Replace this process with `celery worker`, its environment set first (the loop config
    and PROMETHEUS_MULTIPROC_DIR must be in place before celery and prometheus_client load)."""
    try:
        cfg = loop_config(args)
    except ValueError as e:
        return err(str(e))
    env = dict(os.environ)
    env.update(loop_env(args))
    env.update(cfg.to_env())
    env["REDIS_URL"] = cfg.redis_url
    env["INSTRUCTLOOP_WORKER_METRICS_PORT"] = str(args.metrics_port)
    mp_dir = Path(args.metrics_dir or tempfile.mkdtemp(prefix="instructloop-worker-metrics-"))
    from instructloop.training.loop.metrics import MULTIPROC_ENV

    if mp_dir.exists():
        for f in mp_dir.glob("*.db"):  # stale samples of an earlier run would be summed in
            f.unlink()
    mp_dir.mkdir(parents=True, exist_ok=True)
    env[MULTIPROC_ENV] = str(mp_dir)
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [
        sys.executable, "-m", "celery", "-A", "instructloop.training.loop.celery_app", "worker",
        "-Q", cfg.queue, "-c", "1", "-P", args.pool,
        "--prefetch-multiplier", "1",
        "--loglevel", args.loglevel,
        "-n", args.hostname,
        "-E",
    ]  # fmt: skip
    if args.pool == "prefork" and args.max_tasks_per_child:
        cmd += ["--max-tasks-per-child", str(args.max_tasks_per_child)]
    print(
        f"instructloop worker: queue {cfg.queue}, pool {args.pool}, broker {cfg.redis_url}, "
        f"metrics :{args.metrics_port} ({mp_dir})",
        file=sys.stderr,
        flush=True,
    )
    os.execve(sys.executable, cmd, env)
    return EXIT_FAILED  # not reached


def _beat(args: argparse.Namespace) -> int:
    from instructloop.training.loop.config import CycleConfig

    try:
        cycle_cfg = CycleConfig.load(args.cycle_config)
    except ValueError as e:
        return err(str(e))
    if args.tick <= 0:
        return err("--tick must be positive")
    os.environ.update(loop_env(args))  # before the loop's Celery app reads its settings
    try:
        from instructloop.training.loop.beat import AnotherBeat, Schedule, run_beat
        from instructloop.training.loop.celery_app import loop_config

        cfg = loop_config()
    except ValueError as e:
        return err(str(e))
    schedule = Schedule(
        every_s=float(args.every),
        threshold=int(args.threshold),
        min_new=int(args.min_new),
        tick_s=float(args.tick),
    )
    try:
        run_beat(cfg, schedule, cycle_cfg, wait=not args.no_wait, loglevel=args.loglevel)
    except AnotherBeat as e:
        return err(str(e))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    w = sub.add_parser(
        "worker",
        help="run a training worker (Celery, queue 'training', one task at a time)",
        description="A Celery worker for the training loop's queue: one task at a time, late "
        "acks, prefetch 1; heavy steps run in a subprocess. Scale out with more workers.",
    )
    add_redis_args(w)
    w.add_argument(
        "--pool",
        choices=("prefork", "solo"),
        default="prefork",
        help="prefork (default): tasks run in a child process, the worker survives its death; "
        "solo: one process",
    )
    w.add_argument("--metrics-port", type=int, default=9109, help="Prometheus port (0: off)")
    w.add_argument("--metrics-dir", default=None, help="PROMETHEUS_MULTIPROC_DIR (default: temp)")
    w.add_argument("--hostname", default="instructloop@%h", help="Celery node name")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument(
        "--max-tasks-per-child", type=int, default=0, help="recycle the pool child (0: never)"
    )
    w.set_defaults(func=_worker)

    b = sub.add_parser(
        "beat",
        help="run the cycle schedule (only one beat is active; others wait)",
        description="Send a tick every --tick seconds; a tick starts a cycle when --every "
        "seconds passed since the last cycle (and some feedback is new), or when --threshold "
        "rankings/comparisons arrived since the last reward model. Holds a Redis lock: a "
        "second beat waits until the first is gone (or exits with --no-wait).",
    )
    add_redis_args(b)
    b.add_argument("--every", type=float, default=3600.0, help="schedule period, s (0: off)")
    b.add_argument(
        "--threshold", type=int, default=0, help="new rankings+comparisons that start a cycle "
        "(0: off)"
    )  # fmt: skip
    b.add_argument("--min-new", type=int, default=1, help="new feedback a scheduled cycle needs")
    b.add_argument("--tick", type=float, default=60.0, help="how often to check, s")
    b.add_argument("--cycle-config", default=None, help="JSON CycleConfig for started cycles")
    b.add_argument("--no-wait", action="store_true", help="exit if another beat is active")
    b.add_argument("--loglevel", default="INFO")
    b.set_defaults(func=_beat)
