"""Chaos benchmark: kill the parts the service is made of, mid-work, and count what was lost.

Five scenarios, each on real processes and its own private, durable redis-server (AOF,
`appendfsync always`):

- `redis_kill`: writers submit rankings through a real `instructloop serve` (or, with
  `--redis-via store`, straight through FeedbackStore, no engine); Redis is SIGKILLed and
  restarted on the same port and directory. Every writer retries a failed write with the same
  idempotency key until it is acknowledged, as a client should. Counted: writes acknowledged,
  acknowledged records missing after the restart (read back from Redis and replayed through the
  same path: a replay must answer "duplicate" with the same id), attempts that failed during the
  outage, records stored twice, and the time from the restart to the first acknowledged write.
- `worker_kill`: a real `instructloop worker` runs a cycle on tiny models; its whole process
  group is SIGKILLed while the PPO step trains, and a new worker starts. Checked: the live
  version stays the parent until the promote step, the candidate checkpoint is whole (every
  tensor of the parent's names and shapes loads), each step finished once (attempt counts), and
  the registry announced the candidate once.
- `beat_twice`: two `instructloop beat` processes start together with a threshold the seeded
  feedback meets; then the active one is SIGKILLed and the standby takes over. Counted: cycles
  started (target 1), ticks each beat sent, and the takeover time.
- `server_kill`: a server following the registry is SIGKILLed while it swaps to a promoted
  version under load, then restarted. Checked: it comes back serving the live version, says so
  in GetServingModel, and answers.
- `bad_promotion`: clients call Complete without pause; a checkpoint whose safetensors file is
  cut in half is registered unverified and promoted with force. Counted: failed requests
  (target 0), the versions that answered, how soon the replica refused it, and the alert.

Targets: 0 acknowledged records lost, 0 failed requests, no cycle or step run twice.

    python -m benchmarks.chaos [--scenarios redis_kill,bad_promotion] [--redis-via store]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    Proc,
    add_results_name,
    fresh_redis,
    machine,
    python,
    write_results,
)

SCENARIOS = ("redis_kill", "worker_kill", "beat_twice", "server_kill", "bad_promotion")
USER_KEY, ADMIN_KEY = "chaos-user", "chaos-admin"
TMP = RESULTS_DIR / "tmp" / "chaos"
LOGS = RESULTS_DIR / "logs"
# The loop's settings for the worker and beat scenarios: the shipped defaults, except a short
# beat lock, so that a standby takes over in seconds instead of up to 40 (the mechanism is the
# same), and no yielding to serving: other processes on a shared machine may be serving, and a
# paused step would only lengthen the run.
BEAT_LOCK_TTL_S = 6
LOOP_ENV = {
    "INSTRUCTLOOP_BEAT_LOCK_TTL_S": str(BEAT_LOCK_TTL_S),
    "INSTRUCTLOOP_YIELD_TO_SERVING": "false",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def checkpoint_env() -> dict[str, str]:
    """The checkpoint roots the registry accepts, with this benchmark's directories added (its
    copies and tiny models live under benchmarks/results/, outside the data directory)."""
    from instructloop.paths import CHECKPOINT_ROOTS_ENV

    extra = [p for p in os.environ.get(CHECKPOINT_ROOTS_ENV, "").split(os.pathsep) if p]
    return {CHECKPOINT_ROOTS_ENV: os.pathsep.join([*extra, str(RESULTS_DIR)])}


def kill9(p: Proc) -> None:
    """SIGKILL a Proc's whole process group (no shutdown code runs) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.proc.pid, signal.SIGKILL)
    p.proc.wait()
    p.stop()  # closes its log


def group_gone(pgid: int, timeout: float = 30) -> float | None:
    """Seconds until no process of group `pgid` is left; None if some still run."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return None


def scrape(port: int) -> dict[str, float]:
    """Every sample of a Prometheus endpoint, by `name{labels}`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def wait_until(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


# --- 1. Redis killed under feedback load ------------------------------------------------------


class WriteFailed(Exception):
    """A write the service refused or could not make; `code` names how (a gRPC status)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


Submit = Callable[[str, int], Awaitable[tuple[str, bool]]]
"""submit(idempotency key, n): (feedback id, duplicate) of the n-th writer's ranking, or
WriteFailed."""


@dataclass
class RedisKillConfig:
    writers: int = 32
    """Concurrent writers, each with one call in flight."""
    before_s: float = 8.0
    """Load before the kill."""
    outage_s: float = 3.0
    """Redis stays down this long."""
    after_s: float = 8.0
    """Load after the restart."""
    retry_pause_s: float = 0.05
    """A writer's pause after a failed attempt before it retries the same key."""
    give_up_s: float = 60.0
    """A key not acknowledged this long after the load stopped counts as never acknowledged."""


async def redis_kill_run(
    redis: Any, submit: Submit, cfg: RedisKillConfig, via: str
) -> tuple[dict[str, Any], Any]:
    """Writers on `submit` while `redis` (a RedisProcess) is SIGKILLed and restarted on the same
    port and directory; then every acknowledged key is read back and replayed. Returns the
    figures and the restarted RedisProcess (the caller stops it)."""
    import redis as redis_lib

    from instructloop.feedback.keys import Keys
    from instructloop.redis_server import RedisProcess

    acked: dict[str, tuple[str, bool, float]] = {}  # key -> (feedback id, duplicate, time)
    failures: list[tuple[float, str]] = []
    unexpected: list[str] = []
    retried_keys: set[str] = set()
    stop = asyncio.Event()
    give_up = asyncio.Event()

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"w{w}-{i}"
            while True:
                try:
                    fid, dup = await submit(key, w)
                except WriteFailed as e:
                    failures.append((time.time(), e.code))
                    retried_keys.add(key)
                    if give_up.is_set():
                        return
                    await asyncio.sleep(cfg.retry_pause_s)
                    continue
                except Exception as e:  # anything but a refusal is a bug
                    unexpected.append(f"{type(e).__name__}: {e}")
                    return
                acked[key] = (fid, dup, time.time())
                break
            i += 1

    tasks = [asyncio.create_task(writer(w)) for w in range(cfg.writers)]
    t_start = time.time()
    await asyncio.sleep(cfg.before_s)
    t_kill = time.time()
    redis.stop(kill=True)  # SIGKILL: no shutdown, no final fsync
    acked_at_kill = len(acked)
    log(f"redis_kill: Redis SIGKILLed after {acked_at_kill} acknowledged writes")
    await asyncio.sleep(cfg.outage_s)
    t_restart = time.time()
    restarted = await asyncio.to_thread(
        RedisProcess(dir=redis.dir, port=redis.port, appendfsync="always").start
    )
    t_up = time.time()
    log(f"redis_kill: Redis answering again {t_up - t_restart:.2f} s after its restart")
    await asyncio.sleep(cfg.after_s)
    stop.set()
    t_stop = time.time()
    _, pending = await asyncio.wait(tasks, timeout=cfg.give_up_s)
    give_up.set()
    if pending:
        await asyncio.wait(pending, timeout=30)

    times = sorted(t for _, _, t in acked.values())
    # Acknowledgements that arrive after the kill but before the restart are of writes Redis
    # made (and fsynced) before it died, answered late.
    after_up = [t for t in times if t >= t_restart]
    between = [t for t in times if t_kill <= t < t_restart]
    first_after = after_up[0] if after_up else None
    last_before = max((t for t in times if t < t_kill), default=None)
    outage_fail = [c for t, c in failures if t_kill <= t <= (first_after or t_stop)]

    # Read back: every acknowledged record whole in Redis and in the feedback log, once.
    keys = Keys()
    check = redis_lib.Redis.from_url(restarted.url, decode_responses=True)
    try:
        ids = [fid for fid, _, _ in acked.values()]
        pipe = check.pipeline(transaction=False)
        for fid in ids:
            pipe.hget(keys.feedback(fid), "feedback_id")
        stored = pipe.execute()
        missing = sum(1 for fid, got in zip(ids, stored, strict=True) if got != fid)
        logged = [e[1].get("feedback_id") for e in check.xrange(keys.feedback_log)]
        missing_from_log = len(set(ids) - set(logged))
        stored_twice = len(logged) - len(set(logged))
        never_acked = len(set(logged) - set(ids))
    finally:
        check.close()

    # Replay every acknowledged key through the same path: a lost record would be stored anew
    # under a new id, a kept one answers duplicate with its id.
    replay_lost, replay_failed = 0, 0
    sem = asyncio.Semaphore(cfg.writers)

    async def replay(key: str, fid: str) -> None:
        nonlocal replay_lost, replay_failed
        async with sem:
            try:
                got, dup = await submit(key, int(key[1:].split("-")[0]))
            except WriteFailed:
                replay_failed += 1
                return
            if got != fid or not dup:
                replay_lost += 1

    t_replay = time.time()
    await asyncio.gather(*(replay(k, v[0]) for k, v in acked.items()))
    replay_s = time.time() - t_replay

    codes: dict[str, int] = {}
    for _, c in failures:
        codes[c] = codes.get(c, 0) + 1
    res = {
        "via": via,
        "writers": cfg.writers,
        "load_s": round(t_stop - t_start, 1),
        "acked": len(acked),
        "acked_before_kill": acked_at_kill,
        "acked_between_kill_and_restart": len(between),
        "acked_as_duplicate": sum(1 for _, d, _ in acked.values() if d),
        "write_rate_before_kill_per_s": round(acked_at_kill / cfg.before_s, 1),
        "lost": missing,
        "lost_from_log": missing_from_log,
        "lost_on_replay": replay_lost,
        "replay_failed": replay_failed,
        "replayed": len(acked),
        "replay_s": round(replay_s, 1),
        "stored_twice": stored_twice,
        "stored_not_acked": never_acked,
        "failed_attempts": len(failures),
        "failed_attempts_during_outage": len(outage_fail),
        "keys_retried": len(retried_keys),
        "failure_codes": codes,
        "unexpected_errors": unexpected[:5],
        "redis_down_s": round(t_up - t_kill, 2),
        "redis_restart_to_answer_s": round(t_up - t_restart, 2),
        "restart_to_first_ack_s": (
            None if first_after is None else round(first_after - t_restart, 3)
        ),
        "answering_to_first_ack_s": (
            None if first_after is None else round(max(first_after - t_up, 0.0), 3)
        ),
        "client_outage_s": (
            None
            if first_after is None or last_before is None
            else round(first_after - last_before, 2)
        ),
    }
    res["target_met"] = (
        missing == 0 and missing_from_log == 0 and replay_lost == 0 and stored_twice == 0
        and not unexpected and first_after is not None
    )  # fmt: skip
    return res, restarted


def fake_completion(i: int, k: int = 4) -> Any:
    """A completion record as the server logs one (for the engine-free store path)."""
    from instructloop.feedback.records import CompletionRecord, ResponseRecord, new_id

    now = time.time()
    msgs = [{"role": "user", "content": f"Name a colour ({i})."}]
    return CompletionRecord(
        completion_id=new_id("cmpl"), model_version="v1", user_id="chaos", prompt=None,
        messages=msgs, prompt_text=msgs[0]["content"], prompt_token_ids=[1, 2, 3],
        sampling={"temperature": 1.0, "n": k}, metadata={}, created_at=now, finished_at=now,
        responses=[ResponseRecord(new_id("resp"), j, f"colour {j}", [5], "stop", 1)
                   for j in range(k)],
    )  # fmt: skip


async def redis_kill_via_store(redis_dir: Path, cfg: RedisKillConfig) -> dict[str, Any]:
    """The Redis kill with the writers calling FeedbackStore directly (no server, no engine)."""
    from instructloop.feedback.config import StoreConfig
    from instructloop.feedback.errors import StoreUnavailable
    from instructloop.feedback.store import FeedbackStore
    from instructloop.redis_server import RedisProcess

    shutil.rmtree(redis_dir, ignore_errors=True)
    redis = RedisProcess(dir=redis_dir, appendfsync="always").start()
    restarted = None
    store = FeedbackStore.from_url(
        redis.url, StoreConfig(rate_limit_per_minute=0, socket_timeout_s=2.0, retries=1)
    )
    try:
        recs = [fake_completion(i) for i in range(8)]
        for rec in recs:
            await store.log_completion(rec)

        async def submit(key: str, w: int) -> tuple[str, bool]:
            rec = recs[hash(key) % len(recs)]
            order = [r.response_id for r in rec.responses]
            try:
                ack = await store.submit_ranking(
                    user_id=f"user-{w}", idempotency_key=key, completion_id=rec.completion_id,
                    ranked_response_ids=order[::-1] if w % 2 else order,
                )  # fmt: skip
            except StoreUnavailable as e:
                raise WriteFailed("StoreUnavailable") from e
            return ack.feedback_id, ack.duplicate

        res, restarted = await redis_kill_run(redis, submit, cfg, "FeedbackStore")
        return res
    finally:
        await store.close()
        redis.stop()
        if restarted is not None:
            restarted.stop()


# --- the serving scenarios: one server on one private Redis ------------------------------------


@dataclass
class Call:
    start: float
    end: float
    ok: bool
    version: str = ""
    error: str = ""


def user_md() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {USER_KEY}"),)


def admin_md() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {ADMIN_KEY}"),)


async def complete_load(
    port: int, stop: asyncio.Event, out: list[Call], concurrency: int, max_tokens: int
) -> None:
    """`concurrency` clients calling Complete without pause until `stop`."""
    import grpc

    from instructloop.v1 import completion_pb2, completion_pb2_grpc

    async def client(k: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = completion_pb2_grpc.CompletionServiceStub(ch)
            n = 0
            while not stop.is_set():
                req = completion_pb2.CompletionRequest(
                    messages=[completion_pb2.ChatMessage(
                        role="user", content=f"Tell me about topic {k}-{n}.")],
                    max_tokens=max_tokens, temperature=0.0, user_id=f"chaos-{k}",
                )  # fmt: skip
                t0 = time.time()
                try:
                    r = await stub.Complete(req, metadata=user_md(), timeout=120)
                    out.append(Call(t0, time.time(), True, r.model_version))
                except grpc.aio.AioRpcError as e:
                    out.append(Call(t0, time.time(), False, error=e.code().name))
                    await asyncio.sleep(0.1)  # a client backs off; no hot loop on a dead server
                n += 1

    await asyncio.gather(*(client(k) for k in range(concurrency)))


async def serving_model(port: int) -> Any:
    import grpc

    from instructloop.v1 import model_pb2, model_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        return await model_pb2_grpc.ModelServiceStub(ch).GetServingModel(
            model_pb2.GetServingModelRequest(), metadata=admin_md(), timeout=10
        )


async def promote_rpc(port: int, version: str, force: bool) -> str:
    """PromoteModel as an operator calls it; "" or the refusal's status name and details."""
    import grpc

    from instructloop.v1 import model_pb2, model_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            await model_pb2_grpc.ModelServiceStub(ch).PromoteModel(
                model_pb2.PromoteModelRequest(version=version, force=force),
                metadata=admin_md(), timeout=30,
            )  # fmt: skip
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"
    return ""


class Serving:
    """One private durable Redis with the default model live, and one `instructloop serve`
    following the registry on it (its own vLLM engine)."""

    def __init__(self, model_dir: Path) -> None:
        from instructloop.registry import ModelRegistry

        self.model_dir = model_dir
        self.redis = fresh_redis("chaos-serving-redis")
        self.registry = ModelRegistry(self.redis.url)
        self.v1 = self.registry.ensure_live(model_dir).version
        self.port = 0
        self.metrics_port = 0
        self.proc: Proc | None = None
        self.starts = 0

    def start_server(self) -> float:
        """Start the server (on the same gRPC port as before, if any) and wait until it serves;
        returns the seconds that took."""
        from benchmarks.serving import ENGINE_ENV, MAX_MODEL_LEN, wait_grpc
        from instructloop.redis_server import free_port

        self.port = self.port or free_port()
        self.metrics_port = free_port()
        self.starts += 1
        cmd = [
            python(), "-m", "instructloop", "serve",
            "--grpc-port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--redis-url", self.redis.url, "--max-model-len", str(MAX_MODEL_LEN),
            "--follow-live", "--feedback-rate-limit", "0", "--replica-id", "chaos-a",
        ]  # fmt: skip
        env = {
            **ENGINE_ENV, **checkpoint_env(), "INSTRUCTLOOP_API_KEYS": USER_KEY,
            "INSTRUCTLOOP_ADMIN_KEYS": ADMIN_KEY,
        }  # fmt: skip
        t0 = time.time()
        self.proc = Proc(cmd, env=env, log=LOGS / f"chaos-serve-{self.starts}.log")
        wait_grpc(self.port, self.proc, timeout=600)
        return round(time.time() - t0, 1)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.registry.close()
        self.redis.stop()


async def make_completions(port: int, count: int) -> list[tuple[str, list[str]]]:
    """Completions of 4 candidates each, for the rankings to refer to."""
    import grpc

    from instructloop.v1 import completion_pb2, completion_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = completion_pb2_grpc.CompletionServiceStub(ch)
        out = []
        for i in range(count):
            r = await stub.Complete(
                completion_pb2.CompletionRequest(
                    messages=[completion_pb2.ChatMessage(role="user", content=f"A colour ({i})?")],
                    n=4, max_tokens=8, user_id="chaos-setup",
                ),
                metadata=user_md(), timeout=300,
            )  # fmt: skip
            out.append((r.completion_id, [c.response_id for c in r.choices]))
        return out


async def redis_kill_via_grpc(sv: Serving, cfg: RedisKillConfig) -> dict[str, Any]:
    import grpc

    from instructloop.v1 import feedback_pb2, feedback_pb2_grpc

    comps = await make_completions(sv.port, 8)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{sv.port}") for _ in range(4)]
    stubs = [feedback_pb2_grpc.FeedbackServiceStub(c) for c in channels]

    async def submit(key: str, w: int) -> tuple[str, bool]:
        cid, rids = comps[hash(key) % len(comps)]
        try:
            ack = await stubs[w % len(stubs)].SubmitRanking(
                feedback_pb2.SubmitRankingRequest(
                    user_id=f"user-{w}", idempotency_key=key, completion_id=cid,
                    ranked_response_ids=rids[::-1] if w % 2 else rids,
                ),
                metadata=user_md(), timeout=10,
            )  # fmt: skip
        except grpc.aio.AioRpcError as e:
            raise WriteFailed(e.code().name) from e
        return ack.feedback_id, ack.duplicate

    try:
        res, restarted = await redis_kill_run(sv.redis, submit, cfg, "gRPC SubmitRanking")
    finally:
        for c in channels:
            await c.close()
    sv.redis = restarted  # the serving scenarios after this one run on the restarted server
    return res


def truncated_copy(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src` whose safetensors file is cut to half its size."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    with st.open("r+b") as f:
        f.truncate(st.stat().st_size // 2)
    return dst


def register_unverified(registry: Any, path: Path) -> tuple[str, str]:
    """Register `path` as an operator forcing it would: first as `model register` does by
    default (verified; the refusal, if any, is returned), then unverified. Returns (version,
    the verified registration's refusal or "")."""
    try:
        return registry.register(path, source="chaos").version, ""
    except Exception as e:  # CheckpointRejected where checkpoints are verified
        refusal = f"{type(e).__name__}: {e}"
    return registry.register(path, source="chaos", verify=None).version, refusal


async def bad_promotion(sv: Serving, concurrency: int, before_s: float, after_s: float) -> dict:
    bad_dir = truncated_copy(sv.model_dir, TMP / "bad-truncated")
    bad, register_refusal = register_unverified(sv.registry, bad_dir)
    m0 = scrape(sv.metrics_port)
    calls: list[Call] = []
    stop = asyncio.Event()
    load = asyncio.create_task(complete_load(sv.port, stop, calls, concurrency, 16))
    try:
        await asyncio.sleep(before_s)
        refused_without_force = await promote_rpc(sv.port, bad, force=False)
        t_promote = time.time()
        forced_error = await promote_rpc(sv.port, bad, force=True)
        live_after_promote = sv.registry.live()
        refused_s = None
        deadline = time.time() + 120
        while time.time() < deadline:
            if scrape(sv.metrics_port).get("instructloop_swap_failed") == 1:
                refused_s = round(time.time() - t_promote, 2)
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(after_s)
        sm = await serving_model(sv.port)
        m1 = scrape(sv.metrics_port)
        # Back to the good version: the alert must clear.
        t_back = time.time()
        back_error = await promote_rpc(sv.port, sv.v1, force=False)
        cleared_s = None
        while time.time() < t_back + 60:
            m = scrape(sv.metrics_port)
            if (
                m.get("instructloop_swap_failed") == 0
                and m.get("instructloop_replica_behind_live") == 0
            ):
                cleared_s = round(time.time() - t_back, 2)
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2)
    finally:
        stop.set()
        await load
    failed = [c for c in calls if not c.ok]
    during = [c for c in calls if c.end >= t_promote and c.start <= t_back]
    reason = ""
    for line in reversed(sv.proc.tail(400).splitlines() if sv.proc else []):
        if "hot swap to" in line and "failed" in line:
            reason = line.split("failed;", 1)[-1].strip()[:300]
            break
    failed_key = 'instructloop_swaps_total{outcome="failed"}'
    res = {
        "concurrency": concurrency,
        "max_tokens": 16,
        "bad_checkpoint": "model.safetensors cut to half its size",
        "bad_version": bad,
        "register_verified_refused": register_refusal,
        "promote_without_force_refused": refused_without_force,
        "promote_with_force_error": forced_error,
        "live_after_forced_promote": live_after_promote.version if live_after_promote else None,
        "requests": len(calls),
        "requests_during_bad_live": len(during),
        "failed": len(failed),
        "errors": sorted({c.error for c in failed}),
        "versions_answering": sorted({c.version for c in calls if c.ok}),
        "refused_by_replica_s": refused_s,
        "swap_failure_reason": reason,
        "failed_swaps": m1.get(failed_key, 0) - m0.get(failed_key, 0),
        "serving_while_bad_live": sm.model.version,
        "live_reported_by_replica": sm.live_version,
        "alert_while_bad_live": m1.get("instructloop_swap_failed"),
        "promote_back_error": back_error,
        "alert_cleared_after_promote_back_s": cleared_s,
    }
    res["target_met"] = (
        not failed and res["versions_answering"] == [sv.v1] and sm.model.version == sv.v1
        and refused_s is not None and cleared_s is not None
    )  # fmt: skip
    return res


async def server_kill(
    sv: Serving, concurrency: int, kill_after_s: float, max_tokens: int
) -> dict[str, Any]:
    """Promote a good copy of the model while requests run, SIGKILL the server `kill_after_s`
    into its swap, restart it."""
    v2_dir = TMP / "v2-copy"
    if not (v2_dir / "model.safetensors").exists():
        shutil.rmtree(v2_dir, ignore_errors=True)
        shutil.copytree(sv.model_dir, v2_dir)
    v2 = sv.registry.register(v2_dir, source="chaos").version
    calls: list[Call] = []
    stop = asyncio.Event()
    load = asyncio.create_task(complete_load(sv.port, stop, calls, concurrency, max_tokens))
    await asyncio.sleep(3)  # requests in flight, so the swap drains
    m0 = scrape(sv.metrics_port)
    ok_key = 'instructloop_swaps_total{outcome="ok"}'
    t_promote = time.time()
    sv.registry.promote(v2)
    swap_started = None
    while time.time() < t_promote + 60:
        m = scrape(sv.metrics_port)
        if m.get("instructloop_replica_behind_live") == 1:
            swap_started = time.time()
            break
        await asyncio.sleep(0.02)
    if swap_started is None:
        stop.set()
        await load
        raise RuntimeError(f"the server never began its swap to {v2}")
    await asyncio.sleep(kill_after_s)
    m = scrape(sv.metrics_port)
    mid_swap = (
        m.get(ok_key, 0) == m0.get(ok_key, 0) and m.get("instructloop_replica_behind_live") == 1
    )
    assert sv.proc is not None
    pgid = sv.proc.proc.pid
    t_kill = time.time()
    kill9(sv.proc)
    gone_s = await asyncio.to_thread(group_gone, pgid)
    stop.set()
    await load
    # The requests the killed process was serving (a client would retry them elsewhere).
    in_flight_lost = [c for c in calls if not c.ok and c.start <= t_kill]
    log(f"server_kill: killed {t_kill - swap_started:.2f} s into the swap (mid swap: {mid_swap})")
    start_s = await asyncio.to_thread(sv.start_server)
    sm = await serving_model(sv.port)
    live = sv.registry.live()
    after: list[Call] = []
    stop2 = asyncio.Event()
    load2 = asyncio.create_task(complete_load(sv.port, stop2, after, concurrency, 16))
    await asyncio.sleep(5)
    stop2.set()
    await load2
    res = {
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "to_version": v2,
        "promote_to_swap_start_s": round(swap_started - t_promote, 3),
        "killed_into_swap_s": round(t_kill - swap_started, 3),
        "killed_mid_swap": mid_swap,
        "processes_gone_s": gone_s,
        "requests_before_kill": sum(1 for c in calls if c.end <= t_kill),
        "requests_lost_with_the_process": len(in_flight_lost),
        "restart_to_serving_s": start_s,
        "after_restart_serving": sm.model.version,
        "after_restart_live_reported": sm.live_version,
        "registry_live": live.version if live else None,
        "after_restart_requests": len(after),
        "after_restart_failed": sum(1 for c in after if not c.ok),
        "after_restart_versions": sorted({c.version for c in after if c.ok}),
    }
    res["target_met"] = (
        mid_swap and sm.model.version == sm.live_version == res["registry_live"] == v2
        and bool(after) and res["after_restart_failed"] == 0
        and res["after_restart_versions"] == [v2]
    )  # fmt: skip
    return res


# --- the loop scenarios: tiny models on a real worker ----------------------------------------


def build_tiny_policy(out: Path, tokenizer_from: Path) -> Path:
    """A random 2-layer Llama (hidden 64) with the default model's tokenizer and chat template,
    in float32: a cycle on it trains in seconds (tests/support/models.py builds the same)."""
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        head_dim=32,  # the smallest head size vLLM's CPU attention supports
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config.dtype = torch.float32
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copyfile(tokenizer_from / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


PROMPTS = [
    "Name a colour.", "Say something about the sea.", "What is two plus two?",
    "Write one short line about Redis.", "Name an animal that can fly.",
    "Describe rain in three words.", "Recommend a book.", "Give me a rhyme for cat.",
]  # fmt: skip
ANSWERS = ["blue", "It is a big blue sea.", "hat", "four", "Redis is fast.", "a bird"]


def seed_feedback(redis_url: str, n: int = 8, k: int = 4) -> None:
    """`n` completions of k answers, each ranked shortest first (a programmatic preference)."""
    from instructloop.feedback.config import StoreConfig
    from instructloop.feedback.records import CompletionRecord, ResponseRecord, new_id
    from instructloop.feedback.store import FeedbackStore

    async def go() -> None:
        store = FeedbackStore.from_url(redis_url, StoreConfig(rate_limit_per_minute=0))
        try:
            for i in range(n):
                msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
                texts = [ANSWERS[(i + j) % len(ANSWERS)] + " " * j for j in range(k)]
                now = time.time()
                rec = CompletionRecord(
                    completion_id=new_id("cmpl"), model_version="v1", user_id=f"user-{i % 4}",
                    prompt=None, messages=msgs,
                    prompt_text=f"<|im_start|>user\n{msgs[0]['content']}<|im_end|>\n"
                    "<|im_start|>assistant\n",
                    prompt_token_ids=[1, 2, 3], sampling={"temperature": 1.0, "n": k},
                    metadata={}, created_at=now, finished_at=now,
                    responses=[ResponseRecord(new_id("resp"), j, texts[j], [5, 6], "stop", 2)
                               for j in range(k)],
                )  # fmt: skip
                await store.log_completion(rec)
                order = sorted(range(k), key=lambda j: (len(texts[j].strip()), j))
                await store.submit_ranking(
                    user_id=rec.user_id, idempotency_key=None, completion_id=rec.completion_id,
                    ranked_response_ids=[rec.responses[j].response_id for j in order],
                )  # fmt: skip
        finally:
            await store.close()

    asyncio.run(go())


def tiny_cycle_config(work_dir: Path, ppo_episodes: int) -> dict[str, Any]:
    """A cycle whose heavy steps are as small as they go, with a gate every candidate passes
    (tests/support/loop.py has the same)."""
    ptx = work_dir.parent / "ptx_heldout.jsonl"
    ptx.parent.mkdir(parents=True, exist_ok=True)
    ptx.write_text("".join(json.dumps({"text": f"{q} {a}"}) + "\n"
                           for q, a in zip(PROMPTS, ANSWERS, strict=False)))  # fmt: skip
    return {
        "work_dir": str(work_dir),
        "min_feedback": 1,
        "recipe": "instructgpt",
        "reward_model": {"batch_size": 2, "max_length": 64, "epochs": 1, "device": "cpu"},
        "ppo": {
            "total_episodes": ppo_episodes, "batch_size": 4, "minibatch_size": 2,
            "max_new_tokens": 8, "max_prompt_length": 64, "gamma_ptx": 1.0,
            "ptx_batch_size": 2, "ptx_max_length": 32, "warmup_steps": 0, "device": "cpu",
        },
        "evaluate": {"n_prompts": 6, "max_tokens": 16, "batch_size": 4, "device": "cpu",
                     "ptx_path": str(ptx)},
        "gate_min_win_rate_rm": 0.0,
        "gate_min_win_rate_judge": 0.0,
        "gate_max_ptx_loss_increase": 1e9,
        "gate_max_constraint_accuracy_drop": 1.0,
    }  # fmt: skip


@dataclass
class Loop:
    """A private Redis with a tiny policy live and seeded feedback, and the loop's processes."""

    name: str
    tiny: Path
    redis: Any = None
    v1: str = ""
    procs: list[Proc] = field(default_factory=list)
    work: Path = field(init=False)

    def __post_init__(self) -> None:
        from instructloop.registry import ModelRegistry

        self.redis = fresh_redis(f"chaos-{self.name}-redis")
        reg = ModelRegistry(self.redis.url)
        try:
            self.v1 = reg.ensure_live(self.tiny, source="init").version
        finally:
            reg.close()
        seed_feedback(self.redis.url)
        self.work = RESULTS_DIR / "work" / f"chaos-{self.name}"
        shutil.rmtree(self.work, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {**LOOP_ENV, **checkpoint_env(), "REDIS_URL": self.redis.url}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python(), "-m", "instructloop", *args], env={**os.environ, **self.env()}, cwd=REPO,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def worker(self, n: int) -> Proc:
        from instructloop.redis_server import free_port

        p = Proc(
            [python(), "-m", "instructloop", "worker", "--metrics-port", str(free_port()),
             "--hostname", f"chaos-{self.name}-{n}@%h", "--loglevel", "INFO"],
            env=self.env(), log=LOGS / f"chaos-{self.name}-worker-{n}.log",
        )  # fmt: skip
        self.procs.append(p)
        wait_until(lambda: " ready." in p.tail(200) or not p.alive(), 120, "the worker")
        if not p.alive():
            raise RuntimeError(f"worker exited:\n{p.tail()}")
        return p

    def config_file(self, ppo_episodes: int) -> Path:
        p = TMP / f"{self.name}-cycle.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(tiny_cycle_config(self.work, ppo_episodes)))
        return p

    def store(self) -> Any:
        import redis as redis_lib

        from instructloop.feedback.keys import DEFAULT_KEY_PREFIX
        from instructloop.training.loop.store import CycleStore

        return CycleStore(redis_lib.Redis.from_url(self.redis.url), DEFAULT_KEY_PREFIX, 3600)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.alive():
                kill9(p)  # a worker's warm shutdown would wait for its running step
            else:
                p.stop()
        # A step's process group dies with its worker; any left behind is stopped here.
        with contextlib.suppress(Exception):
            for cycle_id in self.store().recent(100):
                for pid in step_processes(cycle_id):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.redis.stop()


def step_processes(cycle_id: str) -> list[int]:
    """Pids of the `run-step` processes of `cycle_id` ("" for any) and their process groups
    (vLLM's engine core started by a step shares its group)."""
    leaders = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run-step" in cmd and any(cycle_id.encode() in c for c in cmd):
            leaders.add(int(d.name))
    pids = set(leaders)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(d.name)) in leaders:
                    pids.add(int(d.name))
    return sorted(pids)


class LiveWatch:
    """Every live version the registry shows (polled) and every announcement it publishes, from
    now until stop()."""

    def __init__(self, redis_url: str) -> None:
        import redis as redis_lib

        from instructloop.registry import ModelRegistry

        self.registry = ModelRegistry(redis_url)
        self.sub_client = redis_lib.Redis.from_url(redis_url)
        self.pubsub = self.sub_client.pubsub()
        self.pubsub.subscribe(self.registry.events_channel)
        self.seen: list[tuple[float, str]] = []
        self.announced: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            live = self.registry.live()
            v = live.version if live else ""
            if not self.seen or self.seen[-1][1] != v:
                self.seen.append((time.time(), v))
            msg = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
            while msg is not None:
                data = msg["data"]
                self.announced.append(
                    (time.time(), data.decode() if isinstance(data, bytes) else str(data))
                )
                msg = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pubsub.close()
        self.sub_client.close()
        self.registry.close()


def tensors_match(candidate: Path, parent: Path) -> tuple[bool, str]:
    """Does every tensor of the candidate load, with the parent's names and shapes?"""
    from safetensors import safe_open

    def shapes(p: Path) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for f in sorted(p.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    out[k] = tuple(st.get_tensor(k).shape)  # reads every byte
        return out

    try:
        a, b = shapes(candidate), shapes(parent)
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    if a != b:
        return False, f"{len(a)} tensors against the parent's {len(b)}, or other shapes"
    return True, f"{len(a)} tensors, all loaded, the parent's names and shapes"


def worker_kill(tiny: Path, ppo_episodes: int, kill_timeout_s: float) -> dict[str, Any]:
    from instructloop.registry import ModelRegistry
    from instructloop.training.loop.config import STEPS
    from instructloop.training.loop.store import TERMINAL

    lp = Loop("worker", tiny)
    watch = LiveWatch(lp.redis.url)
    try:
        w1 = lp.worker(1)
        t0 = time.time()
        run = lp.cli("cycle", "run", "--config", str(lp.config_file(ppo_episodes)))
        if run.returncode != 0:
            raise RuntimeError(f"cycle run failed: {run.stderr}")
        cycle_id = run.stdout.strip().splitlines()[0]
        store = lp.store()

        def ppo_state() -> str:
            rec = store.get(cycle_id)
            if rec is None:
                return ""
            if rec.state in TERMINAL:
                raise RuntimeError(f"cycle ended before PPO: {rec.state} {rec.reason}")
            return str(rec.steps.get("ppo", {}).get("state", ""))

        wait_until(lambda: ppo_state() == "running", 600, "the PPO step", poll=0.5)
        t_ppo = time.time()
        log(f"worker_kill: PPO running {t_ppo - t0:.0f} s into the cycle")
        # Kill once PPO has taken an update (partial training state on disk), so the attempt
        # is cut in the middle; after kill_timeout_s anyway.
        attempt = lp.work / cycle_id / "ppo" / "attempt-1"

        def updates() -> int:
            f = attempt / "model.metrics.jsonl"
            try:
                return sum(1 for x in f.read_text().splitlines() if x.strip())
            except OSError:
                return 0

        with contextlib.suppress(TimeoutError):
            wait_until(lambda: updates() >= 1, kill_timeout_s, "a PPO update", poll=0.2)
        n_updates = updates()
        files_at_kill = sorted(str(p.relative_to(attempt)) for p in attempt.rglob("*"))[:40]
        t_kill = time.time()
        kill9(w1)
        status = lp.cli("cycle", "status", cycle_id, "--json")
        at_kill = json.loads(status.stdout) if status.returncode == 0 else {}
        orphans_s = wait_until(
            lambda: (time.time() - t_kill) if not step_processes(cycle_id) else None,
            60, "the orphaned step processes to die",
        )  # fmt: skip
        live_after_kill = watch.seen[-1][1] if watch.seen else ""
        log(f"worker_kill: worker killed after {n_updates} PPO update(s); starting another")
        w2 = lp.worker(2)

        def ended() -> Any:
            rec = store.get(cycle_id)
            return rec if rec is not None and rec.state in TERMINAL else None

        rec = wait_until(ended, 1200, "the cycle to end", poll=1.0)
        t_end = time.time()
        time.sleep(1)  # the watcher's last poll
        reg = ModelRegistry(lp.redis.url)
        try:
            cand = reg.get(rec.candidate_version) if rec.candidate_version else None
            history = reg.history()
            versions = [(v.version, v.source) for v in reg.list()]
        finally:
            reg.close()
        watch.stop()
        complete, detail = (
            tensors_match(Path(cand.path), tiny) if cand is not None else (False, "no candidate")
        )
        promote_start = float(rec.steps.get("promote", {}).get("started_at") or t_end)
        ppo2 = rec.steps.get("ppo", {})
        seen = [v for _, v in watch.seen]
        # Only the parent is live until the promote step starts; then only the candidate.
        early = [
            v for t, v in watch.seen
            if v not in (lp.v1, "") and (v != rec.candidate_version or t < promote_start)
        ]  # fmt: skip
        ppo_dirs = sorted(p.name for p in (lp.work / cycle_id / "ppo").iterdir())
        attempts = {s: rec.steps.get(s, {}).get("attempts") for s in STEPS}
        res = {
            "model": "tiny Llama (2 layers, hidden 64), float32",
            "ppo_episodes": ppo_episodes,
            "state": rec.state,
            "reason": rec.reason,
            "cycle_s": round(t_end - t0, 1),
            "ppo_started_after_s": round(t_ppo - t0, 1),
            "killed_after_ppo_updates": n_updates,
            "killed_into_ppo_s": round(t_kill - t_ppo, 1),
            "attempt_files_at_kill": len(files_at_kill),
            "record_at_kill": {
                "state": at_kill.get("state"),
                "current_step": at_kill.get("current_step"),
                "ppo": (at_kill.get("steps") or {}).get("ppo"),
            },
            "step_processes_gone_s": round(float(orphans_s), 2),
            "live_after_kill": live_after_kill,
            "parent": lp.v1,
            "ppo_resumed_after_kill_s": (
                round(float(ppo2["started_at"]) - t_kill, 1) if "started_at" in ppo2 else None
            ),
            "resumed_logged": "resumed cycle" in w2.tail(2000),
            "attempts": attempts,
            "ppo_attempt_dirs": ppo_dirs,
            "candidate": rec.candidate_version,
            "candidate_complete": complete,
            "candidate_check": detail,
            "live_versions_seen": seen,
            "live_other_than_parent_before_promote": early,
            "announcements": [v for _, v in watch.announced],
            "registry_history": history,
            "registered": versions,
        }
        once = {s: 2 if s == "ppo" else 1 for s in STEPS}
        res["target_met"] = (
            rec.state == "promoted" and attempts == once and live_after_kill == lp.v1
            and not early and complete and ppo_dirs == ["attempt-2"]
            and res["announcements"] == [rec.candidate_version]
        )  # fmt: skip
        return res
    finally:
        with contextlib.suppress(Exception):
            watch.stop()
        lp.close()


def beat_twice(tiny: Path, window_s: float) -> dict[str, Any]:
    """Two beats started together; the seeded feedback meets their threshold; later the active
    one is SIGKILLed. Counts cycles and the ticks each beat sent."""
    lp = Loop("beat", tiny)
    try:
        lp.worker(1)
        cfg = lp.config_file(4)
        store = lp.store()
        beats: list[Proc] = []
        t0 = time.time()
        for name in ("a", "b"):
            beats.append(Proc(
                [python(), "-m", "instructloop", "beat", "--every", "0", "--threshold", "8",
                 "--tick", "1", "--cycle-config", str(cfg), "--loglevel", "INFO"],
                env=lp.env(), log=LOGS / f"chaos-beat-{name}.log",
            ))  # fmt: skip
        lp.procs.extend(beats)

        def roles() -> tuple[Proc, Proc] | None:
            act = [b for b in beats if "beat: active" in b.tail(400)]
            standby = [b for b in beats if "waiting as standby" in b.tail(400)]
            return (act[0], standby[0]) if len(act) == 1 and len(standby) == 1 else None

        active, standby = wait_until(roles, 120, "one active beat and one standby", poll=0.5)
        first = wait_until(lambda: store.recent(10), 60, "a cycle started by the beat")
        t_first = time.time()
        log(f"beat_twice: cycle {first[0]} started {t_first - t0:.1f} s after the beats")
        time.sleep(window_s)

        def sent(p: Proc) -> int:
            return p.tail(100000).count("Sending due task instructloop-cycle-tick")

        cycles_before_kill = len(store.recent(100))
        ticks_active, ticks_standby = sent(active), sent(standby)
        t_kill = time.time()
        kill9(active)
        wait_until(lambda: "beat: active" in standby.tail(400), 120, "the standby to take over")
        takeover_s = time.time() - t_kill
        base = sent(standby)
        time.sleep(window_s)
        ticks_after = sent(standby) - base
        cycles = store.recent(100)
        rec = store.get(cycles[0])
        res = {
            "beats": 2,
            "beat_lock_ttl_s": BEAT_LOCK_TTL_S,
            "threshold": 8,
            "seeded_rankings": 8,
            "first_cycle_after_s": round(t_first - t0, 1),
            "window_s": window_s,
            "cycles_started": len(cycles),
            "cycles_before_kill": cycles_before_kill,
            "cycle_trigger": rec.trigger if rec else None,
            "ticks_sent_by_active": ticks_active,
            "ticks_sent_by_standby_while_other_active": ticks_standby,
            "takeover_after_kill_s": round(takeover_s, 1),
            "ticks_sent_after_takeover": ticks_after,
        }
        res["target_met"] = (
            len(cycles) == 1 and ticks_standby == 0 and ticks_active > 0 and ticks_after > 0
        )
        return res
    finally:
        lp.close()


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Settings:
    scenarios: list[str]
    redis_via: str = "grpc"
    redis_kill: RedisKillConfig = field(default_factory=RedisKillConfig)
    load_concurrency: int = 4
    bad_before_s: float = 5.0
    bad_after_s: float = 10.0
    kill_into_swap_s: float = 1.0
    """Into the swap (verify 0.5-0.7 s, drain up to 2 s, load 1-2 s in the swap benchmark):
    the kill lands in its drain or load."""
    swap_max_tokens: int = 128
    ppo_episodes: int = 16
    ppo_kill_timeout_s: float = 120.0
    beat_window_s: float = 10.0


@contextlib.contextmanager
def timed(name: str, results: dict[str, Any]) -> Iterator[None]:
    t0 = time.time()
    log(f"== {name}")
    try:
        yield
    except Exception as e:
        results[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "target_met": False}
        log(f"{name} failed: {e}")
    finally:
        if isinstance(results.get(name), dict):
            results[name]["scenario_s"] = round(time.time() - t0, 1)
        log(f"== {name} done in {time.time() - t0:.0f} s")


def run(s: Settings) -> dict[str, Any]:
    from instructloop.paths import default_model_dir

    os.environ.update(checkpoint_env())  # the registry calls made here check the roots too
    model_dir = default_model_dir()
    TMP.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    serving_wanted = [x for x in ("redis_kill", "bad_promotion", "server_kill") if x in s.scenarios]
    if s.redis_via == "store" and "redis_kill" in s.scenarios:
        serving_wanted.remove("redis_kill")
        with timed("redis_kill", results):
            results["redis_kill"] = asyncio.run(
                redis_kill_via_store(TMP / "store-redis", s.redis_kill)
            )
    if serving_wanted:
        sv = Serving(model_dir)
        try:
            startup = sv.start_server()
            log(f"server serving {sv.v1} after {startup} s")
            if "redis_kill" in serving_wanted:
                with timed("redis_kill", results):
                    results["redis_kill"] = asyncio.run(redis_kill_via_grpc(sv, s.redis_kill))
            if "bad_promotion" in serving_wanted:
                with timed("bad_promotion", results):
                    results["bad_promotion"] = asyncio.run(
                        bad_promotion(sv, s.load_concurrency, s.bad_before_s, s.bad_after_s)
                    )
            if "server_kill" in serving_wanted:
                with timed("server_kill", results):
                    results["server_kill"] = asyncio.run(
                        server_kill(sv, s.load_concurrency, s.kill_into_swap_s, s.swap_max_tokens)
                    )
        finally:
            sv.close()
    if "worker_kill" in s.scenarios or "beat_twice" in s.scenarios:
        tiny = build_tiny_policy(TMP / "tiny-policy", model_dir)
        if "beat_twice" in s.scenarios:
            with timed("beat_twice", results):
                results["beat_twice"] = beat_twice(tiny, s.beat_window_s)
        if "worker_kill" in s.scenarios:
            with timed("worker_kill", results):
                results["worker_kill"] = worker_kill(tiny, s.ppo_episodes, s.ppo_kill_timeout_s)
    return {k: results[k] for k in SCENARIOS if k in results}


def _met(r: dict[str, Any]) -> str:
    return "**met**" if r.get("target_met") else "**not met**"


def markdown(res: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"Chaos benchmark, {meta['date']}, {meta['cpu']} ({meta['cores']} cores, load average "
        f"{meta['loadavg_1m']:.1f} at the end). Each scenario on its own private redis-server "
        "(AOF, appendfsync always); processes killed with SIGKILL.",
        "",
        "| scenario | result | target |",
        "|---|---|---|",
    ]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| `{name}` | error: {r['error'].splitlines()[0][:200]} | **not met** |")
            continue
        if name == "redis_kill":
            text = (
                f"{r['acked']:,} rankings acknowledged via {r['via']} ({r['writers']} writers, "
                f"{r['write_rate_before_kill_per_s']:,.0f}/s before the kill); "
                f"**{r['lost']} lost** "
                f"(read back; {r['lost_on_replay']} on replay), {r['stored_twice']} stored twice; "
                f"{r['failed_attempts_during_outage']:,} attempts failed during the "
                f"{r['redis_down_s']:.1f} s outage ({', '.join(r['failure_codes']) or '-'}), "
                f"{r['keys_retried']} keys retried until acknowledged; first acknowledged write "
                f"{r['restart_to_first_ack_s']} s after the restart (Redis answering after "
                f"{r['redis_restart_to_answer_s']} s); {r['acked_between_kill_and_restart']} "
                "acknowledged as Redis died, all kept"
            )
        elif name == "worker_kill":
            text = (
                f"worker group killed {r['killed_into_ppo_s']} s into PPO (after "
                f"{r['killed_after_ppo_updates']} update(s)); live stayed {r['live_after_kill']}; "
                f"PPO resumed {r['ppo_resumed_after_kill_s']} s after the kill; cycle "
                f"{r['state']} in {r['cycle_s']} s; attempts "
                + ", ".join(f"{k} {v}" for k, v in r["attempts"].items())
                + f"; candidate {r['candidate']} whole: {r['candidate_complete']}; announced "
                f"{len(r['announcements'])}x; live before the promotion only the parent: "
                f"{not r['live_other_than_parent_before_promote']}"
            )
        elif name == "beat_twice":
            text = (
                f"**{r['cycles_started']} cycle** started ({r['cycle_trigger']}); ticks sent: "
                f"active {r['ticks_sent_by_active']}, standby "
                f"{r['ticks_sent_by_standby_while_other_active']}; active beat killed: standby "
                f"active {r['takeover_after_kill_s']} s later (lock TTL {r['beat_lock_ttl_s']} s),"
                f" {r['ticks_sent_after_takeover']} ticks after, {r['cycles_started']} cycle(s) "
                "in all"
            )
        elif name == "server_kill":
            text = (
                f"killed {r['killed_into_swap_s']} s into its swap to {r['to_version']} (mid "
                f"swap: {r['killed_mid_swap']}; {r['requests_lost_with_the_process']} requests "
                f"in flight lost with it); restarted and serving in "
                f"{r['restart_to_serving_s']} s on {r['after_restart_serving']} (live "
                f"{r['registry_live']}); {r['after_restart_requests']} requests after, "
                f"{r['after_restart_failed']} failed"
            )
        else:
            alert = r["alert_while_bad_live"]
            text = (
                f"{r['requests']} Complete calls ({r['concurrency']} clients), **{r['failed']} "
                f"failed**; answered by {', '.join(r['versions_answering'])}; the truncated "
                f"checkpoint refused by the replica {r['refused_by_replica_s']} s after the "
                f"forced promotion (alert {'-' if alert is None else int(alert)}), cleared "
                f"{r['alert_cleared_after_promote_back_s']} s after promoting back"
            )
            if r["register_verified_refused"]:
                text += "; a verified registration refused it"
            if r["promote_without_force_refused"]:
                code = r["promote_without_force_refused"].split(":")[0]
                text += f", PromoteModel without force {code}"
        lines.append(f"| `{name}` | {text} | {_met(r)} |")
    lines += [
        "",
        "Targets: 0 acknowledged records lost, 0 failed requests, no cycle or step run twice. "
        "Every figure is in the JSON beside this file.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scenarios", default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )  # fmt: skip
    ap.add_argument(
        "--redis-via", choices=("grpc", "store"), default="grpc",
        help="redis_kill's writers: through the gRPC server, or FeedbackStore (no engine)",
    )  # fmt: skip
    ap.add_argument("--writers", type=int, default=RedisKillConfig.writers)
    ap.add_argument("--outage-s", type=float, default=RedisKillConfig.outage_s)
    ap.add_argument("--ppo-episodes", type=int, default=Settings.ppo_episodes)
    add_results_name(ap, "chaos")
    args = ap.parse_args(argv)
    chosen = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    bad = sorted(set(chosen) - set(SCENARIOS))
    if bad or not chosen:
        ap.error(f"unknown scenario(s) {bad}: choose from {', '.join(SCENARIOS)}")
    s = Settings(
        scenarios=chosen,
        redis_via=args.redis_via,
        redis_kill=RedisKillConfig(writers=args.writers, outage_s=args.outage_s),
        ppo_episodes=args.ppo_episodes,
    )
    t0 = time.time()
    res = run(s)
    meta = {**machine(), "run_s": round(time.time() - t0, 1)}
    md = markdown(res, meta)
    out = write_results(args.name, {"meta": meta, "settings": asdict(s), "result": res}, md)
    print(md)
    print(f"written: {out}")
    return 0 if all(r.get("target_met") for r in res.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
