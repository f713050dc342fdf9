"""Serving benchmark: instructloop's gRPC server against vLLM's own OpenAI-compatible server.

Same machine, same model (the default SmolLM2-135M-Instruct), same engine arguments (the dtype
instructloop resolves on this machine), same prompts, 128 output tokens, greedy, streaming, at
concurrency 1, 8 and 32, in one run. vLLM's server runs as it ships and, where instructloop's
server sets an engine environment of its own on this machine (on 2 cores: no core reserved for
vLLM's scheduler), a second time with that environment (`vllm-openai-matched`), which leaves only
the API layers different. The servers are started, then each level runs on one after the
other, alternating the order over `--reps` short repetitions (only one is ever under load: they
would share the two cores; each run starts SETTLE_S after the previous one's last request, once
that idle engine has stopped spinning).
The load generators are aiohttp for vLLM's server and benchmarks/grpc_load.py's HTTP/2 client for
instructloop's gRPC API; `instructloop-http` calls the same instructloop server's OpenAI API with
the same aiohttp client as vLLM's (`instructloop-grpc-aio` adds grpc.aio's client).

Measured per server and concurrency: output tokens per second (all output tokens / wall time),
time to first token p50/p99, end-to-end latency p50/p99, and the CPU time each server's processes
used during the level: the API process (HTTP or gRPC, the engine client, detokenization), the
engine core (its children) and, for instructloop, its Redis, in CPU milliseconds per output token:
on a small machine the API layer and the engine share the cores, so an API layer that costs more
CPU per token leaves less for the engine; the load generator's own CPU is shown for the same
reason. instructloop logs every completion to a durable Redis (AOF, appendfsync always) before
it answers, as it does in production.

    python -m benchmarks.serving [--concurrency 1 8 32] [--requests-per-level 4 16 64] [--reps 6]
        [--servers vllm-openai vllm-openai-matched instructloop instructloop-http
                   instructloop-grpc-aio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    Proc,
    add_results_name,
    cpu_seconds,
    fresh_redis,
    machine,
    percentile,
    python,
    write_results,
)

# Both servers run the dtype instructloop's engine picks on this machine: bf16 where the CPU has
# bf16 units, float32 on AVX2 only (where forced bf16 is much slower).
from instructloop.hardware import engine_dtype

MAX_TOKENS = 128
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "0"}
MAX_MODEL_LEN = 2048
# vLLM's engine worker busy-spins (sched_yield) for 1 s after its last step before it sleeps
# (shm_broadcast.SpinCondition, busy_loop_s=1), on the core its twin uses: a server started
# within that second of the other's last request loses most of that second to it in its TTFT.
# Only one engine runs in production; here they take turns.
SETTLE_S = 2.0
API_KEY = "bench-key"
# instructloop's server as each of its load generators calls it: our lean HTTP/2 client, and
# grpc.aio's (see grpc_client).
INSTRUCTLOOP_CLIENTS = ("instructloop", "instructloop-http", "instructloop-grpc-aio")
# vLLM's server as it ships, and given the engine environment instructloop's server sets for
# itself (for one, no core held back for the scheduler on a 2-core machine; see
# instructloop/hardware.py), which leaves only the API layers different.
VLLM_SERVERS = ("vllm-openai", "vllm-openai-matched")

TOPICS = [
    "the water cycle", "how vaccines work", "the history of the printing press",
    "why the sky is blue", "photosynthesis", "the rules of chess", "black holes",
    "how a bicycle stays upright", "the French revolution", "machine learning",
    "volcanoes", "the stock market", "coral reefs", "the internet", "honey bees",
    "the moon landing",
]  # fmt: skip


def prompts(model_dir: Path, n: int) -> list[str]:
    """Chat-formatted prompts, rendered once here so both servers get identical text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in detail."}]
        out.append(tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True))
    return out


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    output_tokens: int


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    failed: int
    output_tokens: int
    wall_s: float
    output_tok_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    api_cpu_s: float = 0.0
    """CPU seconds (user + system) of the server's main process over the level."""
    engine_cpu_s: float = 0.0
    """CPU seconds of its child processes (vLLM's engine core) over the level."""
    redis_cpu_s: float = 0.0
    """CPU seconds of the Redis it logs to (instructloop; 0 for vLLM's server)."""
    client_cpu_s: float = 0.0
    """CPU seconds of the load generator (this process) over the level: it shares the cores."""
    rep: int | None = None
    """Which rep of the level this is; None for a level's pooled figures."""


class CpuProbe:
    """CPU seconds used so far by a server: its main process, its descendants, and any other
    processes named (its Redis)."""

    def __init__(self, pid: int, *extra: int) -> None:
        self.pid, self.extra = pid, extra

    def read(self) -> tuple[float, float, float]:
        return (
            cpu_seconds(self.pid, "self"),
            cpu_seconds(self.pid, "children"),
            sum(cpu_seconds(x, "self") for x in self.extra),
        )


def _cpu_ms_per_token(r: LevelResult) -> tuple[float, float, float, float]:
    n = max(r.output_tokens, 1)
    return (
        1e3 * r.api_cpu_s / n,
        1e3 * r.engine_cpu_s / n,
        1e3 * r.redis_cpu_s / n,
        1e3 * r.client_cpu_s / n,
    )


async def _run_level(
    name: str, one, texts: list[str], concurrency: int, n_requests: int, probe: CpuProbe
) -> tuple[LevelResult, list[Sample]]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(texts[i % len(texts)])
    samples: list[Sample] = []
    failed = 0

    async def worker() -> None:
        nonlocal failed
        while True:
            try:
                text = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                samples.append(await one(text))
            except Exception as e:  # counted, and shown once
                failed += 1
                if failed == 1:
                    print(f"  {name}: request failed: {e!r}")

    # The server's processes, then the load generator (this process, all its threads).
    cpu0 = (*probe.read(), time.process_time())
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu1 = (*probe.read(), time.process_time())
    cpu = [round(b - a, 3) for a, b in zip(cpu0, cpu1, strict=True)]
    return _level(name, concurrency, n_requests, failed, wall, samples, *cpu), samples


def _level(
    name: str,
    c: int,
    requests: int,
    failed: int,
    wall: float,
    samples: list[Sample],
    api_cpu_s: float = 0.0,
    engine_cpu_s: float = 0.0,
    redis_cpu_s: float = 0.0,
    client_cpu_s: float = 0.0,
) -> LevelResult:
    tokens = sum(s.output_tokens for s in samples)
    ttft = [s.ttft_s for s in samples]
    e2e = [s.e2e_s for s in samples]
    return LevelResult(
        server=name,
        concurrency=c,
        requests=requests,
        failed=failed,
        output_tokens=tokens,
        wall_s=round(wall, 3),
        output_tok_per_s=round(tokens / wall, 2),
        ttft_p50_s=round(percentile(ttft, 50), 4),
        ttft_p99_s=round(percentile(ttft, 99), 4),
        e2e_p50_s=round(percentile(e2e, 50), 4),
        e2e_p99_s=round(percentile(e2e, 99), 4),
        api_cpu_s=round(api_cpu_s, 3),
        engine_cpu_s=round(engine_cpu_s, 3),
        redis_cpu_s=round(redis_cpu_s, 3),
        client_cpu_s=round(client_cpu_s, 3),
    )


# --- vLLM's OpenAI-compatible server -------------------------------------------------------


def matched_engine_env() -> dict[str, str]:
    """The engine environment instructloop's server would add to ENGINE_ENV on this machine."""
    from instructloop.hardware import (
        RESERVED_CORES_ENV,
        cpu_engine_installed,
        engine_omp_env,
        engine_reserved_cores,
    )

    environ = {**os.environ, **ENGINE_ENV}
    reserved = engine_reserved_cores(None, environ)
    env = {} if reserved is None else {RESERVED_CORES_ENV: str(reserved)}
    if cpu_engine_installed():  # as `instructloop serve` does (instructloop/cli/serve.py)
        env.update(engine_omp_env(None, environ))
    return env


def start_vllm(model_dir: Path, port: int, log: Path, matched: bool = False) -> Proc:
    # `vllm serve` itself fails under vllm-cpu (docs/VLLM-CPU.md, "Installing"); this is the
    # same server.
    from instructloop.serving.config import ServerConfig
    from instructloop.serving.engine import Engine

    cmd = [
        python(), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", "policy",
        "--port", str(port), "--host", "127.0.0.1",
        "--dtype", engine_dtype(model_dir), "--max-model-len", str(MAX_MODEL_LEN),
        "--enforce-eager", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    # Chunked prefill as instructloop's engine resolves it by default (off on the CPU: the seed
    # trap), so that the two servers differ only in their API layer.
    if Engine(str(model_dir), ServerConfig()).engine_args().enable_chunked_prefill is False:
        cmd.append("--no-enable-chunked-prefill")
    return Proc(cmd, env={**ENGINE_ENV, **(matched_engine_env() if matched else {})}, log=log)


def wait_http(url: str, proc: Proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"server exited:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout}s:\n{proc.tail()}")


def vllm_client(port: int, api_key: str | None = None):
    """Streaming /v1/completions calls, as to `vllm serve` (instructloop's OpenAI API too)."""
    import aiohttp

    session: aiohttp.ClientSession | None = None
    url = f"http://127.0.0.1:{port}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def one(text: str) -> Sample:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        body = {
            "model": "policy",
            "prompt": text,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        async with session.post(url, json=body, headers=headers) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        e2e = time.perf_counter() - t0
        return Sample(ttft_s=ttft if ttft is not None else e2e, e2e_s=e2e, output_tokens=tokens)

    async def close() -> None:
        if session is not None:
            await session.close()

    return one, close


# --- instructloop's gRPC server ------------------------------------------------------------


def start_instructloop(
    model_dir: Path,
    port: int,
    metrics_port: int,
    redis_url: str,
    log: Path,
    *extra: str,
    http_port: int | None = None,
):
    http = ["--http-port", str(http_port)] if http_port is not None else []
    cmd = [
        python(), "-m", "instructloop", "serve", *http,
        "--model", str(model_dir), "--grpc-port", str(port), "--metrics-port", str(metrics_port),
        "--redis-url", redis_url, "--max-model-len", str(MAX_MODEL_LEN),
        "--dtype", engine_dtype(model_dir), *extra,
    ]  # fmt: skip
    env = {**ENGINE_ENV, "INSTRUCTLOOP_API_KEYS": API_KEY, "INSTRUCTLOOP_ADMIN_KEYS": ""}
    return Proc(cmd, env=env, log=log)


def wait_grpc(port: int, proc: Proc, timeout: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.support.server import RECONNECT_EVERY_SECOND

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=RECONNECT_EVERY_SECOND) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"server exited:\n{proc.tail()}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(1)
    raise TimeoutError(f"gRPC server not SERVING after {timeout}s:\n{proc.tail()}")


def grpc_client(port: int, lean: bool = True):
    """Streaming calls to instructloop, over benchmarks/grpc_load.py's HTTP/2 client (`lean`)
    or grpc.aio's. The lean one is the default: grpc.aio's client spends more CPU per output
    token than aiohttp spends on vLLM's SSE (benchmarks/HISTORY.md), CPU the load generator
    takes from the cores both servers share; `--servers instructloop-grpc-aio` runs it
    alongside."""
    import grpc

    from benchmarks.grpc_load import Connection
    from instructloop.v1 import completion_pb2, completion_pb2_grpc

    meta = (("authorization", f"Bearer {API_KEY}"),)
    channel: grpc.aio.Channel | None = None
    conn: Connection | None = None
    path = "/instructloop.v1.CompletionService/StreamComplete"

    async def chunks(req: completion_pb2.CompletionRequest) -> AsyncIterator[Any]:
        nonlocal channel, conn
        if lean:
            if conn is None:
                conn = await Connection.open("127.0.0.1", port)
            async for raw in conn.stream(path, req.SerializeToString(), meta):
                yield completion_pb2.CompletionChunk.FromString(raw)
        else:
            if channel is None:
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = completion_pb2_grpc.CompletionServiceStub(channel)
            async for chunk in stub.StreamComplete(req, metadata=meta, timeout=600):
                yield chunk

    async def one(text: str) -> Sample:
        req = completion_pb2.CompletionRequest(
            prompt=text, max_tokens=MAX_TOKENS, temperature=0.0, user_id="bench"
        )
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        async for chunk in chunks(req):
            if ttft is None and any(c.text for c in chunk.choices):
                ttft = time.perf_counter() - t0
            if chunk.HasField("usage"):
                tokens = chunk.usage.completion_tokens
        e2e = time.perf_counter() - t0
        return Sample(ttft_s=ttft if ttft is not None else e2e, e2e_s=e2e, output_tokens=tokens)

    async def close() -> None:
        if channel is not None:
            await channel.close()
        if conn is not None:
            conn.close()

    return one, close


# --- driver --------------------------------------------------------------------------------


async def bench_interleaved(
    clients: dict[str, tuple],
    texts: list[str],
    levels: list[int],
    per_level: list[int],
    reps: int,
    per_request: dict[str, list[list[float]]] | None = None,
    per_rep: list[LevelResult] | None = None,
) -> list[LevelResult]:
    """Both servers are up; each level runs `reps` times per server, alternating which goes
    first, so drift in a shared machine's speed hits both alike. A level's figures pool its
    reps: throughput = all tokens / all wall time, percentiles over all requests, CPU summed.
    `per_request` collects every request's [TTFT, E2E, output tokens] in completion order, per
    "server c=N rep R" (to see where a percentile's outlier sits); `per_rep` collects each rep's
    own figures (for the paired comparison in `markdown`)."""
    for one, _close, _probe in clients.values():
        await asyncio.sleep(SETTLE_S)
        await one(texts[0])  # warm-up: first-request costs are not part of the comparison
    results = []
    for c, n in zip(levels, per_level, strict=True):
        runs: dict[str, list[LevelResult]] = {name: [] for name in clients}
        samples: dict[str, list[Sample]] = {name: [] for name in clients}
        for rep in range(reps):
            order = list(clients) if rep % 2 == 0 else list(reversed(clients))
            for name in order:
                one, _close, probe = clients[name]
                await asyncio.sleep(SETTLE_S)  # the other engine stops spinning
                r, ss = await _run_level(name, one, texts, c, n, probe)
                r.rep = rep
                runs[name].append(r)
                samples[name] += ss
                if per_rep is not None:
                    per_rep.append(r)
                if per_request is not None:
                    per_request[f"{name} c={c} rep {rep}"] = [
                        [round(x.ttft_s, 4), round(x.e2e_s, 4), x.output_tokens] for x in ss
                    ]
                api, eng, red, cli = _cpu_ms_per_token(r)
                print(f"  {name:12s} c={c:<3d} rep {rep}: {r.output_tok_per_s:8.1f} tok/s  "
                      f"TTFT p50 {r.ttft_p50_s:.3f}s  E2E p50 {r.e2e_p50_s:.2f}s  "
                      f"CPU ms/token api {api:.2f} engine {eng:.2f} redis {red:.2f} "
                      f"client {cli:.2f}  failed {r.failed}")  # fmt: skip
        for name in clients:
            results.append(_pool(name, c, runs[name], samples[name]))
    return results


def _pool(name: str, c: int, runs: list[LevelResult], samples: list[Sample]) -> LevelResult:
    """One level's reps as one: all tokens over all wall time, percentiles over all requests."""
    wall = sum(r.wall_s for r in runs)
    return _level(
        name,
        c,
        sum(r.requests for r in runs),
        sum(r.failed for r in runs),
        wall,
        samples,
        sum(r.api_cpu_s for r in runs),
        sum(r.engine_cpu_s for r in runs),
        sum(r.redis_cpu_s for r in runs),
        sum(r.client_cpu_s for r in runs),
    )


# Two-sided 95% Student t quantiles by degrees of freedom (a table: no scipy needed for this).
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def paired_ratios(
    reps: list[LevelResult], name: str, c: int, baseline: str = "vllm-openai"
) -> list[tuple[float, float]]:
    """(throughput ratio, TTFT p50 ratio) of `name` to `baseline` for each rep of level c:
    the runs of one rep are adjacent in time, so each ratio sees one state of the host."""
    by = {(r.server, r.concurrency, r.rep): r for r in reps}
    out = []
    for rep in sorted({r.rep for r in reps if r.rep is not None}):
        a, b = by.get((name, c, rep)), by.get((baseline, c, rep))
        if a and b and b.output_tok_per_s and b.ttft_p50_s:
            out.append((a.output_tok_per_s / b.output_tok_per_s, a.ttft_p50_s / b.ttft_p50_s))
    return out


def mean_ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, 0.0
    t = _T95.get(len(xs) - 1, 2.0)
    return m, t * statistics.stdev(xs) / math.sqrt(len(xs))


def markdown(
    results: list[LevelResult], meta: dict[str, object], reps: list[LevelResult] | None = None
) -> str:
    lines = [
        f"Serving benchmark, {meta['date']}, {meta['cpu']} ({meta['cores']} cores), "
        f"{meta['model']} ({meta.get('dtype', 'bfloat16')}), {MAX_TOKENS} output tokens, "
        "greedy, streaming.",
        "",
        "| server | concurrency | output tok/s | TTFT p50 (s) | TTFT p99 (s) | E2E p50 (s) "
        "| E2E p99 (s) | failed | CPU ms/token: API | engine | Redis | load generator |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        api, eng, red, cli = _cpu_ms_per_token(r)
        lines.append(
            f"| {r.server} | {r.concurrency} | {r.output_tok_per_s:.1f} | {r.ttft_p50_s:.3f} | "
            f"{r.ttft_p99_s:.3f} | {r.e2e_p50_s:.2f} | {r.e2e_p99_s:.2f} | {r.failed} "
            f"| {api:.2f} | {eng:.2f} | {red:.2f} | {cli:.2f} |"
        )
    lines.append("")
    lines.append(
        "Target: instructloop throughput >= vLLM's server at every concurrency, TTFT p50 <= 1.1x."
    )
    if any(r.server == VLLM_SERVERS[1] for r in results):
        lines.append(
            f"({VLLM_SERVERS[1]}: vLLM's server given the engine environment instructloop's "
            f"server sets on this machine, {meta.get('matched_env') or '-'}; "
            f"{VLLM_SERVERS[0]}: as it ships.)"
        )
    by = {(r.server, r.concurrency): r for r in results}
    for base in VLLM_SERVERS:
        for name in INSTRUCTLOOP_CLIENTS:
            for c in sorted({r.concurrency for r in results}):
                a, b = by.get((name, c)), by.get((base, c))
                if a and b and b.output_tok_per_s and b.ttft_p50_s:
                    lines.append(
                        f"- {name} c={c} against {base}: throughput ratio "
                        f"{a.output_tok_per_s / b.output_tok_per_s:.2f}x, "
                        f"TTFT p50 ratio {a.ttft_p50_s / b.ttft_p50_s:.2f}x"
                    )
    if reps:
        lines += [
            "",
            "Paired by rep (each rep's two runs are adjacent in time, so the host's drift over "
            "minutes, larger than the servers' difference, cancels in each ratio): the ratio per "
            "rep, its mean and 95% confidence interval.",
            "",
            "| server | against | concurrency | throughput ratio per rep | mean (95% CI) "
            "| TTFT p50 ratio per rep | mean (95% CI) |",
            "|---|---|---:|---|---|---|---|",
        ]
        for base in VLLM_SERVERS:
            for name in INSTRUCTLOOP_CLIENTS:
                for c in sorted({r.concurrency for r in reps}):
                    pairs = paired_ratios(reps, name, c, base)
                    if not pairs:
                        continue
                    cells = []
                    for xs in ([p[0] for p in pairs], [p[1] for p in pairs]):
                        m, h = mean_ci95(xs)
                        cells += [
                            " ".join(f"{x:.2f}" for x in xs),
                            f"{m:.3f}x [{m - h:.3f}, {m + h:.3f}]",
                        ]
                    lines.append(f"| {name} | {base} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from instructloop.paths import default_model_dir
    from instructloop.redis_server import free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--requests-per-level",
        type=int,
        nargs="+",
        default=[4, 16, 64],
        help="requests per server in each rep of a level (c=32: two waves of 32)",
    )
    ap.add_argument(
        "--servers",
        nargs="+",
        default=None,
        choices=[*VLLM_SERVERS, *INSTRUCTLOOP_CLIENTS],
        help="default: vllm-openai, instructloop, and vllm-openai-matched where instructloop's "
        "engine environment differs from vLLM's default on this machine; instructloop-grpc-aio: "
        "the same instructloop server, called with grpc.aio's client",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=6,
        help="runs per server and level, alternated (short runs, many turns: the shared host's "
        "speed drifts over minutes by more than the two servers differ)",
    )
    add_results_name(ap, "serving")
    args = ap.parse_args()
    model_dir = args.model or default_model_dir()
    matched_env = matched_engine_env()
    servers = args.servers or [
        "vllm-openai",
        "instructloop",
        "instructloop-http",
        *(["vllm-openai-matched"] if matched_env else []),
    ]
    texts = prompts(model_dir, 64)
    logs = RESULTS_DIR / "logs"

    procs: list[Proc] = []
    clients: dict[str, tuple] = {}
    redis = fresh_redis("serving-redis")
    try:
        # Both servers are up together (an idle engine takes no CPU), so their runs can
        # alternate; see bench_interleaved.
        # One instructloop server for all its clients: (gRPC port, HTTP port, CPU probe).
        il: tuple[int, int, CpuProbe] | None = None
        for name in servers:
            if name in VLLM_SERVERS:
                print(f"{name}: starting")
                port = free_port()
                proc = start_vllm(
                    model_dir, port, logs / f"serving-{name}.log", matched=name == VLLM_SERVERS[1]
                )
                procs.append(proc)
                wait_http(f"http://127.0.0.1:{port}/health", proc)
                clients[name] = (*vllm_client(port), CpuProbe(proc.proc.pid))
                continue
            if il is None:
                print("instructloop: starting")
                port, http_port = free_port(), free_port()
                proc = start_instructloop(
                    model_dir, port, free_port(), redis.url, logs / "serving-instructloop.log",
                    http_port=http_port,
                )  # fmt: skip
                procs.append(proc)
                wait_grpc(port, proc)
                il = (port, http_port, CpuProbe(proc.proc.pid, redis.proc.pid))
            if name == "instructloop-http":
                clients[name] = (*vllm_client(il[1], api_key=API_KEY), il[2])
                continue
            lean = name == "instructloop"
            clients[name] = (*grpc_client(il[0], lean=lean), il[2])

        async def go() -> list[LevelResult]:
            try:
                return await bench_interleaved(
                    clients,
                    texts,
                    args.concurrency,
                    args.requests_per_level,
                    args.reps,
                    per_request,
                    per_rep,
                )
            finally:
                for _one, close, _probe in clients.values():
                    await close()

        per_request: dict[str, list[list[float]]] = {}
        per_rep: list[LevelResult] = []
        results = asyncio.run(go())
    finally:
        for proc in procs:
            proc.stop()
        redis.stop()

    meta = {
        **machine(),
        "model": model_dir.name,
        "dtype": engine_dtype(model_dir),
        "matched_env": " ".join(f"{k}={v}" for k, v in matched_env.items()),
        "max_tokens": MAX_TOKENS,
    }
    md = markdown(results, meta, per_rep)
    out = write_results(
        args.name,
        {
            "meta": meta,
            "results": [asdict(r) for r in results],
            "reps": [asdict(r) for r in per_rep],
            "per_request": per_request,
        },
        md,
    )
    print(md)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
