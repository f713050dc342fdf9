"""Feedback benchmark: SubmitRanking RPCs per second at concurrency 64, with durable writes.

The server is `instructloop serve` (its vLLM engine running, as in production) on a private
redis-server with AOF and `appendfsync always`: an RPC is answered only after Redis wrote and
fsynced the record. The rankings refer to real completions (n=4) produced by the server first.
Every ranking is distinct (its own idempotency key), so each one is a real write. The load
generator shares the cores with the server: by default it is benchmarks/grpc_load.py, an
HTTP/2 gRPC client that takes less CPU per call than grpc.aio's client (which gets a row too;
benchmarks/HISTORY.md).

    python -m benchmarks.feedback [--concurrency 64] [--seconds 20] [--runs uvloop/lean,...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    add_results_name,
    cpu_seconds,
    fresh_redis,
    machine,
    percentile,
    write_results,
)
from benchmarks.serving import API_KEY, start_instructloop, wait_grpc

TARGET_RPS = 2000
TARGET_P99_S = 0.050


async def make_completions(port: int, count: int) -> list[tuple[str, list[str]]]:
    import grpc

    from instructloop.v1 import completion_pb2, completion_pb2_grpc

    meta = (("authorization", f"Bearer {API_KEY}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = completion_pb2_grpc.CompletionServiceStub(ch)

        async def one(i: int) -> tuple[str, list[str]]:
            req = completion_pb2.CompletionRequest(
                messages=[completion_pb2.ChatMessage(role="user", content=f"Name a colour ({i}).")],
                n=4,
                max_tokens=8,
                user_id="bench-setup",
            )
            r = await stub.Complete(req, metadata=meta, timeout=300)
            return r.completion_id, [c.response_id for c in r.choices]

        return list(await asyncio.gather(*(one(i) for i in range(count))))


SUBMIT_RANKING = "/instructloop.v1.FeedbackService/SubmitRanking"
LOAD_GENERATORS = ("lean", "grpc-aio")


async def open_submitters(kind: str, port: int, connections: int):
    """`connections` ways to send one SubmitRanking each (one HTTP/2 connection each, as
    several app instances would have), and a close function. `lean`: benchmarks/grpc_load.py
    (less CPU per call than grpc.aio's client, on the cores the server uses);
    `grpc-aio`: grpc.aio's own client. A send returns None, or the status name of a failed
    call."""
    meta = (("authorization", f"Bearer {API_KEY}"),)
    if kind == "lean":
        from benchmarks.grpc_load import Connection, GrpcError
        from instructloop.v1 import feedback_pb2

        conns = [await Connection.open("127.0.0.1", port) for _ in range(connections)]
        lean_meta = (*meta, ("grpc-timeout", "10S"))

        def lean(conn: Connection):
            async def submit(req) -> str | None:
                try:
                    reply = await conn.unary(SUBMIT_RANKING, req.SerializeToString(), lean_meta)
                except GrpcError as e:
                    return e.code_name
                feedback_pb2.FeedbackAck.FromString(reply)  # what a client would read
                return None

            return submit

        async def close_lean() -> None:
            for c in conns:
                c.close()

        return [lean(c) for c in conns], close_lean
    if kind != "grpc-aio":
        raise ValueError(f"load generator {kind!r}: one of {', '.join(LOAD_GENERATORS)}")
    import grpc

    from instructloop.v1 import feedback_pb2_grpc

    # Without a local subchannel pool, channels to one target share one connection.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own_connection)
        for _ in range(connections)
    ]

    def aio(stub):
        async def submit(req) -> str | None:
            try:
                await stub.SubmitRanking(req, metadata=meta, timeout=10)
            except grpc.RpcError as e:
                return e.code().name
            return None

        return submit

    async def close_aio() -> None:
        for c in channels:
            await c.close()

    return [aio(feedback_pb2_grpc.FeedbackServiceStub(c)) for c in channels], close_aio


async def load(
    port: int, completions, concurrency: int, seconds: float, users: int, generator: str
):
    from instructloop.v1 import feedback_pb2

    latencies: list[float] = []
    errors: dict[str, int] = {}
    rng = random.Random(0)
    submitters, close = await open_submitters(generator, port, connections=4)
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        submit = submitters[w % len(submitters)]
        i = 0
        while time.perf_counter() < stop_at:
            cid, rids = completions[rng.randrange(len(completions))]
            order = rids[:]
            rng.shuffle(order)
            req = feedback_pb2.SubmitRankingRequest(
                user_id=f"user-{rng.randrange(users)}",
                idempotency_key=f"w{w}-{i}",
                completion_id=cid,
                ranked_response_ids=order,
            )
            i += 1
            t0 = time.perf_counter()
            error = await submit(req)
            if error is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[error] = errors.get(error, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    await close()
    return latencies, errors, wall


def cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process, with its children (the server's vLLM engine core is
    one) except for this process, whose children are the server and Redis."""
    return {
        name: cpu_seconds(pid, "self" if pid == os.getpid() else "all")
        for name, pid in pids.items()
    }


def run_once(args: argparse.Namespace, model_dir: Path, event_loop: str, generator: str) -> dict:
    """One server (on `event_loop`) on a fresh Redis: make completions, then the load from
    `generator`."""
    import redis as redis_lib

    from instructloop.redis_server import free_port

    redis = fresh_redis("feedback-redis")
    port = free_port()
    proc = start_instructloop(
        model_dir, port, free_port(), redis.url,
        RESULTS_DIR / "logs" / f"feedback-server-{event_loop}.log", "--event-loop", event_loop,
    )  # fmt: skip
    try:
        wait_grpc(port, proc)
        client = redis_lib.Redis.from_url(redis.url)
        pids = {"server": proc.proc.pid, "redis": redis.proc.pid, "load_generator": os.getpid()}

        async def setup_then_load() -> tuple[int, dict[str, float], list[float], dict, float]:
            # One event loop for the setup and the load: with grpc.aio used first on another
            # loop (a second asyncio.run), the load generator runs slower, which this benchmark
            # would charge to the server.
            completions = await make_completions(port, args.completions)
            keys, cpu = client.dbsize(), cpu_by_process(pids)
            lat, errors, wall = await load(
                port, completions, args.concurrency, args.seconds, args.users, generator
            )
            return keys, cpu, lat, errors, wall

        fsync = client.config_get("appendfsync")["appendfsync"]
        keys_before, cpu0, lat, errors, wall = asyncio.run(setup_then_load())
        cpu1 = cpu_by_process(pids)
        keys_after = client.dbsize()
        client.close()
    finally:
        proc.stop()
        redis.stop()
    ok = len(lat)
    rps = ok / wall
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return {
        "server_event_loop": event_loop,
        "load_generator": generator,
        "appendfsync": fsync,
        "seconds": round(wall, 2),
        "acknowledged": ok,
        "errors": errors,
        "rps": round(rps, 1),
        "p50_s": round(p50, 5),
        "p99_s": round(p99, 5),
        "redis_keys_added": keys_after - keys_before,
        # Share of one core each used during the load (2 cores = 2.0 in all).
        "cpu_cores_used": {k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in pids},
        "met": rps >= TARGET_RPS and p99 < TARGET_P99_S,
    }


def main() -> None:
    from instructloop.paths import default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--completions", type=int, default=32)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument(
        "--runs",
        default="uvloop/lean,uvloop/grpc-aio,asyncio/lean",
        help="server event loop / load generator pairs to run, one after the other; the "
        "first is the result (uvloop: what the server's default, auto, picks here; lean: "
        "benchmarks/grpc_load.py, grpc-aio: grpc.aio's client, which takes more of the "
        "cores the server shares)",
    )
    add_results_name(ap, "feedback")
    args = ap.parse_args()
    model_dir = args.model or default_model_dir()

    pairs = [tuple(r.split("/")) for r in args.runs.split(",")]
    for pair in pairs:
        if len(pair) != 2 or pair[1] not in LOAD_GENERATORS:
            ap.error(f"--runs: {'/'.join(pair)!r} is not LOOP/GENERATOR ({LOAD_GENERATORS})")
    runs = [run_once(args, model_dir, loop, gen) for loop, gen in pairs]
    first = runs[0]
    meta = {**machine(), "model": model_dir.name, "appendfsync": first["appendfsync"]}
    payload = {
        "meta": meta,
        "concurrency": args.concurrency,
        **{k: v for k, v in first.items() if k != "appendfsync"},
        "target": {"rps": TARGET_RPS, "p99_s": TARGET_P99_S},
        "runs": runs,
    }
    md = (
        f"Feedback benchmark, {meta['date']}, {meta['cpu']} ({meta['cores']} cores): "
        f"SubmitRanking (K=4) over gRPC at concurrency {args.concurrency}, Redis "
        f"appendfsync={first['appendfsync']}, server and load generator on the same machine. "
        "The first row is the result; the others are the same run with another server "
        "event loop or load generator (lean: benchmarks/grpc_load.py, an HTTP/2 client of "
        "its own; grpc-aio: grpc.aio's client).\n\n"
        "| server event loop | load generator | acknowledged | errors | RPC/s | p50 (ms) | "
        "p99 (ms) | CPU cores: server / redis / load | target |\n"
        "|---|---|---:|---|---:|---:|---:|---|---|\n"
    )
    for r in runs:
        cpu = r["cpu_cores_used"]
        md += (
            f"| {r['server_event_loop']} | {r['load_generator']} | {r['acknowledged']} | "
            f"{r['errors'] or 'none'} | "
            f"{r['rps']:.0f} | {r['p50_s'] * 1e3:.1f} | {r['p99_s'] * 1e3:.1f} | "
            f"{cpu['server']:.2f} / {cpu['redis']:.2f} / {cpu['load_generator']:.2f} | "
            f">= {TARGET_RPS}/s, p99 < {TARGET_P99_S * 1e3:.0f} ms: "
            f"{'met' if r['met'] else 'missed'} |\n"
        )
    out = write_results(args.name, payload, md)
    print(md)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
