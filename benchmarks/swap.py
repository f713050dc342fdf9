"""Hot-swap benchmark: promote a new checkpoint while replicas serve 16 concurrent streams.

Two `instructloop serve` replicas (their own vLLM engines, following the registry) share one
durable Redis (AOF, appendfsync always). 16 clients stream greedy 128-token completions without
pause, spread over both replicas. Mid-run the registry promotes a checkpoint in which every
tensor changed (embeddings included), and later rolls back to the first one. Measured:
- requests failed (target: 0);
- end-to-end latency p50/p99 of requests that overlap a swap, against those before any swap;
- time from the promotion until every replica serves the new version (GetServingModel polled
  every 50 ms; target < 5 s for the default model);
- the replicas' own swap phases (drain, load) from their Prometheus metrics, and the requests
  a swap restarted on the new version.

    python -m benchmarks.swap [--streams 16] [--phase-s 40] [--drain-timeout 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    Proc,
    fresh_redis,
    machine,
    percentile,
    python,
    write_results,
)
from benchmarks.serving import ENGINE_ENV, MAX_MODEL_LEN, MAX_TOKENS, prompts, wait_grpc
from instructloop.hardware import engine_dtype

USER_KEY, ADMIN_KEY = "bench-user", "bench-admin"
KEYS = {"INSTRUCTLOOP_API_KEYS": USER_KEY, "INSTRUCTLOOP_ADMIN_KEYS": ADMIN_KEY}


@dataclass
class Req:
    replica: int
    start: float
    end: float
    ttft_s: float
    ok: bool
    version: str = ""
    restarted: bool = False
    error: str = ""


@dataclass
class Swap:
    to_version: str
    promoted_at: float
    converged_s: float
    """Promotion until every replica reported the new version."""
    per_replica_s: list[float]


def start_replica(
    i: int,
    port: int,
    metrics_port: int,
    redis_url: str,
    drain: float,
    cores: str | None,
    dtype: str,
) -> Proc:
    cmd = [
        python(), "-m", "instructloop", "serve",
        "--grpc-port", str(port), "--metrics-port", str(metrics_port), "--redis-url", redis_url,
        "--max-model-len", str(MAX_MODEL_LEN), "--dtype", dtype, "--replica-id", f"r{i}",
        "--follow-live", "--swap-drain-timeout", str(drain), "--swap-poll", "1",
        "--feedback-rate-limit", "0",
    ]  # fmt: skip
    env = {**ENGINE_ENV, **KEYS}
    if cores is not None:
        # Each replica's engine on cores of its own, as replicas on separate machines would be:
        # two engines' OpenMP threads spinning on the same cores starve each other (a reload
        # becomes many times slower).
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    return Proc(cmd, env=env, log=RESULTS_DIR / "logs" / f"swap-r{i}.log")


async def stream_client(
    k: int, ports: list[int], texts: list[str], stop: asyncio.Event, out: list[Req]
) -> None:
    import grpc

    from instructloop.v1 import completion_pb2, completion_pb2_grpc

    replica = k % len(ports)
    meta = (("authorization", f"Bearer {USER_KEY}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[replica]}") as ch:
        stub = completion_pb2_grpc.CompletionServiceStub(ch)
        n = 0
        while not stop.is_set():
            req = completion_pb2.CompletionRequest(
                prompt=texts[(k + n * 7) % len(texts)], max_tokens=MAX_TOKENS, temperature=0.0,
                user_id=f"bench-{k}",
            )  # fmt: skip
            t0 = time.time()
            ttft, version, restarted = None, "", False
            try:
                async for chunk in stub.StreamComplete(req, metadata=meta, timeout=600):
                    if ttft is None and any(c.text for c in chunk.choices):
                        ttft = time.time() - t0
                    restarted = restarted or chunk.restarted
                    version = chunk.model_version
                out.append(Req(replica, t0, time.time(), ttft or 0.0, True, version, restarted))
            except grpc.aio.AioRpcError as e:
                out.append(Req(replica, t0, time.time(), 0.0, False, error=f"{e.code().name}"))
            n += 1


async def serving_version(port: int) -> str:
    import grpc

    from instructloop.v1 import model_pb2, model_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        sm = await model_pb2_grpc.ModelServiceStub(ch).GetServingModel(
            model_pb2.GetServingModelRequest(),
            metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
            timeout=5,
        )
        return sm.model.version


async def promote_and_wait(registry: Any, ports: list[int], version: str | None) -> Swap:
    """Promote `version` (None: roll back); poll until every replica serves it."""
    t0 = time.time()
    mv = registry.promote(version) if version else registry.rollback()
    done: dict[int, float] = {}
    while len(done) < len(ports):
        for i, port in enumerate(ports):
            if i not in done and await serving_version(port) == mv.version:
                done[i] = time.time() - t0
        if time.time() - t0 > 300:
            raise TimeoutError(f"replicas did not converge on {mv.version}: {done}")
        await asyncio.sleep(0.05)
    per = [round(done[i], 3) for i in range(len(ports))]
    return Swap(mv.version, t0, max(per), per)


def scrape(port: int) -> dict[str, float]:
    """The replica's swap series: phase sums and counts, outcomes, restarted requests."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("instructloop_swap", "instructloop_swaps_total")):
            name, _, value = line.rpartition(" ")
            if "_bucket" not in name and "_created" not in name:
                out[name] = float(value)
    return out


def _lat(reqs: list[Req]) -> dict[str, float]:
    e2e = [r.end - r.start for r in reqs]
    ttft = [r.ttft_s for r in reqs]
    return {
        "n": len(reqs),
        "e2e_p50_s": round(percentile(e2e, 50), 3),
        "e2e_p99_s": round(percentile(e2e, 99), 3),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from instructloop.paths import checkpoint_roots, default_model_dir
    from instructloop.redis_server import free_port
    from instructloop.registry import ModelRegistry
    from tests.support.checkpoints import perturb_checkpoint

    model_dir = Path(args.model or default_model_dir())
    pert = RESULTS_DIR / "tmp" / "swap" / "pert"
    if not (pert / "model.safetensors").exists():
        print("building the perturbed checkpoint (every tensor changed)")
        pert.parent.mkdir(parents=True, exist_ok=True)
        perturb_checkpoint(model_dir, pert)
    texts = prompts(model_dir, 64)

    redis = fresh_redis("swap-redis")
    registry = ModelRegistry(redis.url)
    procs: list[Proc] = []
    try:
        v1 = registry.ensure_live(model_dir).version
        # The perturbed copy lives in the results folder: a checkpoint root for this run.
        v2 = registry.register(pert, source="bench", roots=[*checkpoint_roots(), RESULTS_DIR])
        v2 = v2.version
        ports = [free_port() for _ in range(args.replicas)]
        mports = [free_port() for _ in range(args.replicas)]
        dtype = engine_dtype(model_dir)
        n_cpu = os.cpu_count() or 1
        per = n_cpu // args.replicas
        for i in range(args.replicas):
            cores = f"{i * per}-{(i + 1) * per - 1}" if per >= 1 and args.bind_cores else None
            procs.append(
                start_replica(i, ports[i], mports[i], redis.url, args.drain_timeout, cores, dtype)
            )
        for p, port in zip(procs, ports, strict=True):
            wait_grpc(port, p)
        print(f"{args.replicas} replicas serving {v1}; {args.streams} streams")

        reqs: list[Req] = []
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(stream_client(k, ports, texts, stop, reqs))
            for k in range(args.streams)
        ]
        swaps: list[Swap] = []
        t_start = time.time()
        try:
            await asyncio.sleep(args.phase_s)
            for target in (v2, None):  # promote the new checkpoint, then roll back
                swaps.append(await promote_and_wait(registry, ports, target))
                s = swaps[-1]
                print(f"  -> {s.to_version}: every replica in {s.converged_s:.2f} s "
                      f"({s.per_replica_s})")  # fmt: skip
                await asyncio.sleep(args.phase_s)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        t_end = time.time()

        windows = [(s.promoted_at, s.promoted_at + s.converged_s) for s in swaps]
        ok = [r for r in reqs if r.ok]
        before = [r for r in ok if r.end < swaps[0].promoted_at]
        during = [r for r in ok if any(r.start <= b and r.end >= a for a, b in windows)]
        metrics = [scrape(p) for p in mports]
        res = {
            "model": model_dir.name,
            "dtype": dtype,
            "replicas": args.replicas,
            "streams": args.streams,
            "max_tokens": MAX_TOKENS,
            "drain_timeout_s": args.drain_timeout,
            "bind_cores": args.bind_cores,
            "run_s": round(t_end - t_start, 1),
            "requests": len(reqs),
            "failed": len(reqs) - len(ok),
            "errors": sorted({r.error for r in reqs if not r.ok}),
            "restarted_streams": sum(r.restarted for r in ok),
            "versions_seen": sorted({r.version for r in ok}),
            "before_swap": _lat(before),
            "during_swap": _lat(during),
            "swaps": [asdict(s) for s in swaps],
            "replica_metrics": metrics,
            "target_converged_s<5": all(s.converged_s < 5 for s in swaps),
            "target_failed==0": len(reqs) == len(ok),
        }
        return res
    finally:
        for p in procs:
            p.stop()
        registry.close()
        redis.stop()


def markdown(r: dict[str, Any], meta: dict[str, Any]) -> str:
    b, d = r["before_swap"], r["during_swap"]
    lines = [
        f"Hot-swap benchmark, {meta['date']}, {meta['cpu']} ({meta['cores']} cores, load "
        f"average {meta['loadavg_1m']:.1f} at the end), {r['model']} "
        f"({r.get('dtype', 'bfloat16')}), {r['replicas']} replicas, {r['streams']} concurrent "
        f"streams of {r['max_tokens']} greedy tokens, drain "
        f"timeout {r['drain_timeout_s']:g} s, {r['run_s']:.0f} s of load.",
        "",
        "| | requests | E2E p50 (s) | E2E p99 (s) | TTFT p50 (s) | TTFT p99 (s) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| before any swap | {b['n']} | {b['e2e_p50_s']} | {b['e2e_p99_s']} | "
        f"{b['ttft_p50_s']} | {b['ttft_p99_s']} |",
        f"| overlapping a swap | {d['n']} | {d['e2e_p50_s']} | {d['e2e_p99_s']} | "
        f"{d['ttft_p50_s']} | {d['ttft_p99_s']} |",
        "",
        f"- Requests: {r['requests']}, failed: **{r['failed']}** (target 0); streams restarted "
        f"on the new version by a swap: {r['restarted_streams']}.",
    ]
    for s in r["swaps"]:
        lines.append(
            f"- Promotion of {s['to_version']} until every replica served it: "
            f"**{s['converged_s']:.2f} s** (per replica {s['per_replica_s']}; target < 5 s)."
        )
    for i, m in enumerate(r["replica_metrics"]):
        phases = []
        for ph in ("verify", "drain", "load", "total"):
            n = m.get(f'instructloop_swap_duration_seconds_count{{phase="{ph}"}}', 0)
            tot = m.get(f'instructloop_swap_duration_seconds_sum{{phase="{ph}"}}', 0)
            if n:
                phases.append(f"{ph} {tot / n:.2f} s")
        restarted = m.get("instructloop_swap_restarted_requests_total", 0)
        lines.append(
            f"- Replica r{i}: mean per swap {', '.join(phases)}; {restarted:.0f} requests "
            "restarted."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--phase-s", type=float, default=40.0, help="load before/after each swap")
    ap.add_argument("--drain-timeout", type=float, default=2.0)
    ap.add_argument(
        "--bind-cores",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give each replica's engine its own share of the cores (VLLM_CPU_OMP_THREADS_BIND)",
    )
    args = ap.parse_args()
    res = asyncio.run(run(args))
    meta = {**machine(), "model": res["model"]}
    md = markdown(res, meta)
    out = write_results("swap", {"meta": meta, "result": res}, md)
    print(md)
    print(f"written: {out}")
    print(json.dumps({k: res[k] for k in ("failed", "swaps")}, indent=1))


if __name__ == "__main__":
    main()
