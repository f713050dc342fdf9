"""`instructloop up`: everything on one machine.

Redis (a private one unless REDIS_URL names one), the default model, the training worker and
beat as child processes (the server never imports training), and the server; it records where
they live (instructloop/running.py) so that every other verb finds them. Ctrl-C stops it all.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from instructloop.cli.options import EXIT_FAILED, EXIT_USAGE, err, say, setup_logging
from instructloop.cli.serve import (
    UP_HTTP_PORT,
    add_server_args,
    config_from_args,
    engine_omp_env,
    run_event_loop,
    run_server,
)


def training_env(
    environ: Mapping[str, str], redis_url: str, server_only: Mapping[str, str]
) -> dict[str, str]:
    """The training worker's and beat's environment: this process's, with their Redis, less
    what the server set for its own engine (training's engines choose their own settings)."""
    env = {k: v for k, v in environ.items() if k not in server_only}
    env["REDIS_URL"] = redis_url
    return env


def _start_loop(
    redis_url: str, metrics_port: int, server_only: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    """The training worker and beat as child processes (the server never imports training);
    `server_only`: environment the server set for its own engine, not passed on."""
    env = training_env(os.environ, redis_url, server_only)
    cmds = {
        "worker": [sys.executable, "-m", "instructloop", "worker",
                   "--metrics-port", str(metrics_port)],
        "beat": [sys.executable, "-m", "instructloop", "beat"],
    }  # fmt: skip
    procs = []
    for name, cmd in cmds.items():
        proc = subprocess.Popen(cmd, env=env)
        say(f"{name}: started (pid {proc.pid})")
        procs.append(proc)
    return procs


def _stop_loop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()  # Celery's warm shutdown: the running task finishes or is requeued
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if procs:
        say("worker, beat: stopped")


def _redis(args: argparse.Namespace) -> tuple[str, Any]:
    """The Redis to use: $REDIS_URL's (or --redis-url's) if it answers, else a private one
    started here; returns its URL and the process to stop (None when it is not ours)."""
    from instructloop.paths import data_dir
    from instructloop.redis_server import RedisProcess, is_reachable

    redis_url = args.redis_url or os.environ.get("REDIS_URL")
    if redis_url:
        if not is_reachable(redis_url):
            raise _Refused(f"Redis at {redis_url} does not answer")
        say(f"redis: using {redis_url}")
        return redis_url, None
    rdir = data_dir() / "redis"
    say(f"redis: starting a private redis-server (AOF, appendfsync always) in {rdir}")
    proc = RedisProcess(dir=rdir, port=args.redis_port).start()
    say(f"redis: {proc.url}")
    return proc.url, proc


def up_http_port(args: argparse.Namespace) -> int | None:
    """The HTTP API's port under `up`: on by default (UP_HTTP_PORT), --http-port's if given,
    none with --no-http."""
    if args.no_http:
        return None
    return UP_HTTP_PORT if args.http_port is None else int(args.http_port)


class _Refused(Exception):
    """`up` cannot start: the message says why."""


def _announce(args: argparse.Namespace, cfg: Any, redis_url: str, with_loop: bool) -> Any:
    """What runs once the server is ready: record the running loop (instructloop/running.py)
    for the other verbs, and say where everything is."""
    from instructloop.paths import data_dir
    from instructloop.running import RunningLoop, write_running

    def ready(server: Any) -> None:
        port = server.metrics.port
        metrics_url = f"http://{cfg.metrics_host}:{port}/metrics" if port else None
        worker_url = (
            f"http://127.0.0.1:{args.worker_metrics_port}/metrics"
            if with_loop and args.worker_metrics_port
            else None
        )
        record = write_running(
            RunningLoop(
                pid=os.getpid(),
                started_at=time.time(),
                redis_url=redis_url,
                grpc=server.address,
                metrics_url=metrics_url,
                worker_metrics_url=worker_url,
                key_prefix=cfg.key_prefix,
                memory=server.engine.memory_plan,
            )
        )
        say(f"data directory: {data_dir()}  (the other verbs find this loop in {record})")
        say(f"gRPC: {server.address}  (grpcurl -plaintext {server.address} list)")
        if server.http_url:
            say(f"OpenAI API: {server.http_url}/v1  (the openai SDK's base_url)")
            say(f"labelling page: {server.http_url}/label  (docs/LABELLING.md)")
        if metrics_url:
            say(f"metrics: {metrics_url}")
        say(f"model: {server.model.version} {server.model.path}")
        say("next: `instructloop status` shows the loop; `instructloop cycle run --wait` "
            "starts a cycle now")  # fmt: skip

    return ready


def _up(args: argparse.Namespace) -> int:
    """Everything on one machine: Redis (unless REDIS_URL), the default model, the worker and
    beat, the server; everything it started stops with it."""
    from instructloop.memory import GPU_SERVING_SHARE_WITH_TRAINING
    from instructloop.model_init import ModelInitError, init_default_model
    from instructloop.paths import default_model_dir
    from instructloop.running import remove_running
    from instructloop.serving.config import ConfigError

    setup_logging()
    omp_env = engine_omp_env(args)
    redis_proc: Any = None
    loop_procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_url, redis_proc = _redis(args)
        if args.model is None:
            init_default_model(default_model_dir(), progress=say)
        extra: dict[str, Any] = {"redis_url": redis_url, "http_port": up_http_port(args)}
        if not args.no_loop and args.gpu_memory_utilization is None:
            # On one GPU the training stages share it (instructloop/memory.py); no effect on
            # the CPU backend, whose cache comes from the memory plan.
            extra["gpu_memory_utilization"] = GPU_SERVING_SHARE_WITH_TRAINING
        cfg = config_from_args(args, **extra)
        cfg.validate()
        if not args.no_loop:
            loop_procs = _start_loop(redis_url, args.worker_metrics_port, omp_env)
        ready = _announce(args, cfg, redis_url, with_loop=bool(loop_procs))
        return run_event_loop(run_server(cfg, on_ready=ready), cfg.event_loop)
    except (_Refused, ModelInitError) as e:
        return err(str(e), EXIT_FAILED)
    except ConfigError as e:
        return err(str(e), EXIT_USAGE)
    finally:
        remove_running(os.getpid())
        _stop_loop(loop_procs)
        if redis_proc is not None:
            say("redis: stopping")
            redis_proc.stop()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser(
        "up",
        help="run everything on this machine (Redis, default model, server, worker, beat)",
        description="Use REDIS_URL if set, else start a private redis-server with AOF "
        "(appendfsync always) in the data directory; build the default model if missing; "
        "start the training worker and beat; serve gRPC and the OpenAI-compatible HTTP API. "
        "Ctrl-C stops everything.",
    )
    add_server_args(up)
    up.add_argument(
        "--redis-port", type=int, default=0, help="port of the private Redis (0: a free one)"
    )
    up.add_argument(
        "--no-loop", action="store_true", help="start no training worker and beat (serve only)"
    )
    up.add_argument(
        "--worker-metrics-port", type=int, default=9109, help="the worker's Prometheus port"
    )
    up.add_argument(
        "--no-http",
        action="store_true",
        help=f"serve no OpenAI-compatible HTTP API (default: on port {UP_HTTP_PORT})",
    )
    up.set_defaults(func=_up)
