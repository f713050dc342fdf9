"""`instructloop serve`: the gRPC API (and, with --http-port, the OpenAI-compatible HTTP API) on
a vLLM engine, run until SIGINT or SIGTERM.

Also what `up` shares with it: the server's flags, their config, the engine's OpenMP settings
and running the server on the configured event loop. The handlers import the server, so
`instructloop --help` stays quick.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from instructloop.cli.options import EXIT_USAGE, err, say, setup_logging
from instructloop.serving.config import EVENT_LOOPS

UP_HTTP_PORT = 8000
"""The HTTP API's port under `up`: vLLM's and most OpenAI-compatible servers' default, so code
written for them reaches instructloop unchanged."""


def add_server_args(p: argparse.ArgumentParser) -> None:
    """Every ServerConfig flag of `serve` and `up`: long, but one flat list in --help's order."""
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="model directory or hub id (default: the registry's live version, else the "
        "default model built by `instructloop model init`)",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="context length (2048)")
    g.add_argument(
        "--dtype",
        default=None,
        help="weights and activations dtype (auto: the checkpoint's; float32 on a CPU without "
        "native bf16)",
    )
    g.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs per engine (1)")
    g.add_argument(
        "--gpu-memory-utilization", type=float, default=None, help="GPU memory share (0.9)"
    )
    g.add_argument(
        "--kv-cache-space-gib",
        type=float,
        default=None,
        help="KV cache size on the CPU backend (sets VLLM_CPU_KVCACHE_SPACE)",
    )
    g.add_argument(
        "--cpu-cores",
        default=None,
        help="cores for the engine's threads on the CPU backend, e.g. 0-3 "
        "(VLLM_CPU_OMP_THREADS_BIND; default: vLLM's auto)",
    )
    g.add_argument(
        "--cpu-reserved-cores",
        type=int,
        default=None,
        help="cores kept from the model for vLLM's scheduler on the CPU backend "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU; default: 0 on a machine of 2 cores or fewer, else vLLM's)",
    )
    g.add_argument("--max-num-seqs", type=int, default=None, help="most sequences per step")
    g.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="no torch.compile / CUDA graphs (default: on for CPU, off for GPU)",
    )
    g.add_argument(
        "--chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="chunked prefill (default: off on CPU, where seeded requests crash with it)",
    )
    g.add_argument(
        "--default-max-tokens", type=int, default=None, help="max_tokens when unset (256)"
    )

    g = p.add_argument_group("network")
    g.add_argument("--grpc-host", default=None, help="gRPC interface (127.0.0.1)")
    g.add_argument("--grpc-port", type=int, default=None, help="gRPC port (50051; 0: any)")
    g.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="port of the OpenAI-compatible HTTP API (default: none for serve, "
        f"{UP_HTTP_PORT} for up; 0: any)",
    )
    g.add_argument("--http-host", default=None, help="HTTP API interface (127.0.0.1)")
    g.add_argument(
        "--http-access-log", action="store_true", help="log every HTTP request (off: hot path)"
    )
    g.add_argument("--metrics-host", default=None, help="metrics interface (127.0.0.1)")
    g.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (9464)")
    g.add_argument("--no-metrics", action="store_true", help="serve no metrics")
    g.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate (PEM)")
    g.add_argument("--tls-key", type=Path, default=None, help="TLS private key (PEM)")
    g.add_argument(
        "--api-keys-file",
        type=Path,
        default=None,
        help="keys, one per line: KEY, `user KEY`, `admin KEY` or `labeller KEY`, each KEY as "
        "NAME:KEY to name its principal (besides INSTRUCTLOOP_API_KEYS / "
        "INSTRUCTLOOP_ADMIN_KEYS / INSTRUCTLOOP_LABELLER_KEYS)",
    )
    g.add_argument(
        "--label-lease",
        type=float,
        default=None,
        help="seconds a labeller holds a task of the /label queue before it goes back (600)",
    )
    g.add_argument(
        "--labels-per-task",
        type=int,
        default=None,
        help="labels a task needs before it leaves the /label queue (1; 2+ measures agreement)",
    )

    g = p.add_argument_group("storage")
    g.add_argument("--redis-url", default=None, help="Redis (env REDIS_URL, else local 6379/0)")
    g.add_argument("--key-prefix", default=None, help="prefix of every Redis key (il:)")
    g.add_argument(
        "--feedback-rate-limit",
        type=int,
        default=None,
        help="feedback records per user (within its key's principal) per minute (600; 0: no limit)",
    )
    g.add_argument("--replica-id", default=None, help="name of this replica (host-pid)")
    g.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=None,
        help="event loop (auto: uvloop when installed, else asyncio)",
    )

    g = p.add_argument_group(
        "quotas per principal (the owner of an API key: NAME:KEY, else key-<hash>), per minute, "
        "across replicas; 0: no limit (the default)"
    )
    g.add_argument(
        "--quota-completions",
        type=int,
        default=None,
        help="completion requests (env INSTRUCTLOOP_QUOTA_COMPLETIONS_PER_MINUTE)",
    )
    g.add_argument(
        "--quota-tokens",
        type=int,
        default=None,
        help="generated tokens (env INSTRUCTLOOP_QUOTA_TOKENS_PER_MINUTE)",
    )
    g.add_argument(
        "--quota-feedback",
        type=int,
        default=None,
        help="stored feedback records, all users together (env "
        "INSTRUCTLOOP_QUOTA_FEEDBACK_PER_MINUTE)",
    )

    g = p.add_argument_group("hot swap")
    g.add_argument(
        "--follow-live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="swap to every version the registry makes live (default: on without --model, "
        "off with it)",
    )
    g.add_argument(
        "--swap-drain-timeout",
        type=float,
        default=None,
        help="seconds in-flight requests may finish on the old weights before they restart "
        "on the new ones (2)",
    )
    g.add_argument(
        "--swap-poll",
        type=float,
        default=None,
        help="seconds between re-reads of the live version, besides notifications (2)",
    )


def config_from_args(args: argparse.Namespace, **extra: Any) -> Any:
    from instructloop.serving.config import ServerConfig

    overrides: dict[str, Any] = {
        "model": args.model,
        "max_model_len": args.max_model_len,
        "dtype": args.dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "cpu_kvcache_space_gib": args.kv_cache_space_gib,
        "cpu_omp_threads_bind": args.cpu_cores,
        "cpu_reserved_cores": args.cpu_reserved_cores,
        "max_num_seqs": args.max_num_seqs,
        "enforce_eager": args.enforce_eager,
        "enable_chunked_prefill": args.chunked_prefill,
        "default_max_tokens": args.default_max_tokens,
        "grpc_host": args.grpc_host,
        "grpc_port": args.grpc_port,
        "http_host": args.http_host,
        "http_port": args.http_port,
        "http_access_log": args.http_access_log or None,
        "metrics_host": args.metrics_host,
        "metrics_port": args.metrics_port,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "api_keys_file": args.api_keys_file,
        "label_lease_s": args.label_lease,
        "labels_per_task": args.labels_per_task,
        "redis_url": args.redis_url,
        "key_prefix": args.key_prefix,
        "feedback_rate_limit_per_minute": args.feedback_rate_limit,
        "quota_completions_per_minute": args.quota_completions,
        "quota_tokens_per_minute": args.quota_tokens,
        "quota_feedback_per_minute": args.quota_feedback,
        "replica_id": args.replica_id,
        "follow_live": args.follow_live,
        "swap_drain_timeout_s": args.swap_drain_timeout,
        "swap_poll_s": args.swap_poll,
        "event_loop": args.event_loop,
    }
    overrides.update(extra)
    cfg = ServerConfig.from_env(**overrides)
    if args.no_metrics:
        cfg = cfg.with_(metrics_port=None)
    return cfg


async def run_server(cfg: Any, on_ready: Callable[[Any], None] | None = None) -> int:
    """Start the server, show progress while the engine starts, serve until SIGINT/SIGTERM."""
    from instructloop.serving.server import InstructloopServer

    server = InstructloopServer(cfg, progress=say)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    say(f"event loop: {type(loop).__module__.split('.')[0]}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def ticker() -> None:
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(10)
            say(f"... still starting ({time.monotonic() - t0:.0f} s)")

    tick = asyncio.create_task(ticker())
    start = asyncio.create_task(server.start())
    waiter = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        tick.cancel()
    if start not in done:  # interrupted during start
        start.cancel()
        with contextlib.suppress(BaseException):
            await start
        await server.stop(grace=0)
        return 130
    waiter.cancel()
    try:
        start.result()
    except Exception as e:
        await server.stop(grace=0)
        raise SystemExit(f"error: {e}") from e
    # Everything alive now (vLLM, torch, the model config) lives as long as the process: keep it
    # out of the collector's scans, so a full collection does not pause every RPC (vLLM's API
    # server does the same after start-up).
    gc.collect()
    gc.freeze()
    if on_ready is not None:
        on_ready(server)
    say("ready; Ctrl-C stops")
    serve = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({serve, stopper}, return_when=asyncio.FIRST_COMPLETED)
    say(f"stopping (in-flight requests get {cfg.shutdown_grace_s:g} s)")
    await server.stop()
    serve.cancel()
    stopper.cancel()
    return 0


def resolve_event_loop(event_loop: str) -> str:
    """ "auto" -> "uvloop" when it is installed, else "asyncio"; other names as they are."""
    if event_loop != "auto":
        return event_loop
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def run_event_loop(main: Coroutine[Any, Any, int], event_loop: str = "auto") -> int:
    """Run the server's coroutine on the configured loop (ServerConfig.event_loop)."""
    if resolve_event_loop(event_loop) == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise SystemExit("error: --event-loop uvloop, but uvloop is not installed") from None
        return uvloop.run(main)
    return asyncio.run(main)


def engine_omp_env(args: argparse.Namespace) -> dict[str, str]:
    """Put the engine's OpenMP settings (instructloop/hardware.py: engine_omp_env) into this
    process's environment, which the engine's forked processes inherit. Called before anything
    imports torch, whose OpenMP runtime reads them once, at load; returns what it set."""
    from instructloop.hardware import OMP_SPIN_ENV, cpu_engine_installed, engine_omp_env

    if not cpu_engine_installed():
        return {}
    env = engine_omp_env(args.cpu_reserved_cores)
    if not env:
        return {}
    if "torch" in sys.modules:  # too late to take effect; say so rather than pretend
        say(f"engine: {OMP_SPIN_ENV} not set: torch was loaded before the engine's settings")
        return {}
    os.environ.update(env)
    say(
        f"engine: OpenMP threads spin {env[OMP_SPIN_ENV]} turns before they sleep "
        f"({OMP_SPIN_ENV}; they share their cores with vLLM's scheduler and this server)"
    )
    return env


def _serve(args: argparse.Namespace) -> int:
    from instructloop.serving.config import ConfigError

    setup_logging()
    engine_omp_env(args)
    try:
        cfg = config_from_args(args)
        cfg.validate()
        return run_event_loop(run_server(cfg), cfg.event_loop)
    except ConfigError as e:
        return err(str(e), EXIT_USAGE)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = sub.add_parser(
        "serve",
        help="serve the policy over gRPC on vLLM",
        description="Start the vLLM engine and the gRPC API (completions, feedback, model "
        "admin, health, reflection) with Prometheus metrics, and with --http-port the "
        "OpenAI-compatible HTTP API in the same process. Every completion and judgement is "
        "written to Redis before the request is answered OK.",
    )
    add_server_args(serve)
    serve.set_defaults(func=_serve)
