"""Cycle benchmark: one improvement cycle on the default model, step by step, on the real parts.

A replica (`instructloop serve`, following the registry) serves the default model from a durable
Redis. Simulated labellers ask it for K = 4 candidates on verifiable-instruction prompts
(training/data/constraints/) over gRPC and rank them as the simulated users judge
(training/data/simulated_labeler.py, ties kept) with SubmitRanking. Then one cycle runs on a real
`instructloop worker` (`instructloop cycle run --wait`): snapshot -> reward model -> PPO-ptx ->
evaluate -> gate -> promote, with the cycle's default recipe (training/recipes.py) unless `--set`
says otherwise. Reported: the
seconds of each step (from the cycle record), the whole cycle, and the time from the promotion
until the replica served the candidate; the gate's figures beside.

    python -m benchmarks.cycle [--prompts 64] [--set ppo.total_episodes=128 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS_DIR, Proc, fresh_redis, machine, python, write_results
from benchmarks.serving import ENGINE_ENV, MAX_MODEL_LEN, wait_grpc

USER_KEY, ADMIN_KEY = "bench-user", "bench-admin"
K = 4


def _set(cfg: dict[str, Any], assignment: str) -> None:
    """`section.key=value` (value parsed as JSON when it parses) into the cycle config."""
    key, _, raw = assignment.partition("=")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    *path, last = key.split(".")
    node = cfg
    for p in path:
        node = node.setdefault(p, {})
    node[last] = value


async def collect_feedback(port: int, n_prompts: int, max_tokens: int, seed: int) -> int:
    """Simulated labellers over gRPC: K candidates per prompt, ranked by constraints met."""
    import grpc

    from instructloop.training.data.constraints import generate_prompts
    from instructloop.training.data.simulated_labeler import rank, ranking_order
    from instructloop.v1 import completion_pb2, completion_pb2_grpc, feedback_pb2, feedback_pb2_grpc

    meta = (("authorization", f"Bearer {USER_KEY}"),)
    prompts = generate_prompts(n_prompts, "train", seed=seed)
    sent = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        comp = completion_pb2_grpc.CompletionServiceStub(ch)
        fb = feedback_pb2_grpc.FeedbackServiceStub(ch)

        async def one(i: int) -> None:
            nonlocal sent
            p = prompts[i]
            resp = await comp.Complete(
                completion_pb2.CompletionRequest(
                    messages=[completion_pb2.ChatMessage(role="user", content=p.prompt)],
                    n=K, max_tokens=max_tokens, temperature=1.0, user_id=f"labeller-{i % 8}",
                ),
                metadata=meta,
            )  # fmt: skip
            texts = [c.text for c in resp.choices]
            r = rank(p, texts)
            order, ranks = ranking_order(texts, r.responses, r.ranks)
            if len(set(ranks)) == 1:
                return  # all tied: teaches nothing, a labeller would skip it
            await fb.SubmitRanking(
                feedback_pb2.SubmitRankingRequest(
                    user_id=f"labeller-{i % 8}", idempotency_key=f"bench-{i}",
                    completion_id=resp.completion_id,
                    ranked_response_ids=[resp.choices[j].response_id for j in order],
                    ranks=ranks,
                ),
                metadata=meta,
            )  # fmt: skip
            sent += 1

        sem = asyncio.Semaphore(8)

        async def guarded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(guarded(i) for i in range(len(prompts))))
    return sent


async def wait_serving(port: int, version: str, timeout: float = 600) -> float:
    import grpc

    from instructloop.v1 import model_pb2, model_pb2_grpc

    t0 = time.time()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = model_pb2_grpc.ModelServiceStub(ch)
        while time.time() - t0 < timeout:
            sm = await stub.GetServingModel(
                model_pb2.GetServingModelRequest(),
                metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
            )
            if sm.model.version == version:
                return time.time()
            await asyncio.sleep(0.05)
    raise TimeoutError(f"the replica did not serve {version} in {timeout} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from instructloop.feedback.keys import DEFAULT_KEY_PREFIX
    from instructloop.paths import CHECKPOINT_ROOTS_ENV, default_model_dir
    from instructloop.redis_server import free_port
    from instructloop.registry import ModelRegistry
    from instructloop.training.loop.config import STEPS
    from instructloop.training.loop.store import CycleStore

    model_dir = Path(args.model or default_model_dir())
    work = RESULTS_DIR / "work" / "cycle"
    redis = fresh_redis("cycle-redis")
    env = {
        **ENGINE_ENV, "REDIS_URL": redis.url, "INSTRUCTLOOP_API_KEYS": USER_KEY,
        "INSTRUCTLOOP_ADMIN_KEYS": ADMIN_KEY, "TOKENIZERS_PARALLELISM": "false",
        # the cycle writes its candidates under `work`, which must be a checkpoint root
        CHECKPOINT_ROOTS_ENV: str(RESULTS_DIR),
    }  # fmt: skip
    registry = ModelRegistry(redis.url)
    procs: list[Proc] = []
    try:
        v1 = registry.ensure_live(model_dir).version
        port = free_port()
        procs.append(Proc([
            python(), "-m", "instructloop", "serve", "--grpc-port", str(port),
            "--metrics-port", str(free_port()), "--max-model-len", str(MAX_MODEL_LEN),
            "--follow-live", "--feedback-rate-limit", "0",
        ], env=env, log=RESULTS_DIR / "logs" / "cycle-serve.log"))  # fmt: skip
        wait_grpc(port, procs[0])
        t = time.time()
        n_fb = asyncio.run(collect_feedback(port, args.prompts, args.max_tokens, args.seed))
        collect_s = time.time() - t
        print(f"{n_fb} rankings from {args.prompts} prompts in {collect_s:.0f} s")

        procs.append(Proc([python(), "-m", "instructloop", "worker", "--loglevel", "INFO"],
                          env=env, log=RESULTS_DIR / "logs" / "cycle-worker.log"))  # fmt: skip
        cfg: dict[str, Any] = {"work_dir": str(work), "min_feedback": 8}
        for a in args.set:
            _set(cfg, a)
        cfg_path = RESULTS_DIR / "tmp" / "cycle-config.json"
        cfg_path.write_text(json.dumps(cfg))
        t0 = time.time()
        done = subprocess.run(
            [python(), "-m", "instructloop", "cycle", "run", "--wait", "--timeout", "7200",
             "--config", str(cfg_path)],
            env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        cycle_s = time.time() - t0
        if done.returncode != 0:
            raise RuntimeError(f"cycle failed:\n{done.stdout}\n{done.stderr}\n{procs[1].tail(40)}")
        cycle_id = done.stdout.strip().splitlines()[0]
        import redis as redis_lib

        rec = CycleStore(redis_lib.Redis.from_url(redis.url), DEFAULT_KEY_PREFIX).get(cycle_id)
        assert rec is not None
        live = registry.live()
        swap_s = None
        if rec.state == "promoted" and live is not None:
            promoted_at = float(rec.steps["promote"]["finished_at"])
            swap_s = asyncio.run(wait_serving(port, live.version)) - promoted_at
        return {
            "model": model_dir.name,
            "parent": v1,
            "prompts": args.prompts,
            "rankings": n_fb,
            "collect_s": round(collect_s, 1),
            "cycle_id": cycle_id,
            "state": rec.state,
            "reason": rec.reason,
            "cycle_s": round(cycle_s, 1),
            "steps_s": {s: rec.steps.get(s, {}).get("seconds") for s in STEPS},
            "promotion_to_served_s": None if swap_s is None else round(max(swap_s, 0.0), 2),
            "candidate": rec.candidate_version,
            "gate": rec.outputs.get("gate", {}),
            "evaluate": rec.outputs.get("evaluate", {}).get("metrics", {}),
            "config": cfg,
        }
    finally:
        for p in reversed(procs):
            p.stop()
        registry.close()
        redis.stop()


def markdown(r: dict[str, Any], meta: dict[str, Any]) -> str:
    steps = r["steps_s"]
    overrides = {k: v for k, v in r["config"].items() if k != "work_dir"}
    lines = [
        f"Cycle benchmark, {meta['date']}, {meta['cpu']} ({meta['cores']} cores, load average "
        f"{meta['loadavg_1m']:.1f} at the end), {r['model']}: {r['rankings']} K=4 rankings from "
        f"simulated labellers over gRPC ({r['collect_s']:.0f} s), then one cycle on a real "
        f"worker; overrides {json.dumps(overrides)}.",
        "",
        "| step | seconds |",
        "|---|---:|",
        *(f"| {s} | {v if v is not None else '-'} |" for s, v in steps.items()),
        f"| **whole cycle** (`cycle run --wait`) | **{r['cycle_s']}** |",
        "",
        f"- Outcome: {r['state']}{' (' + r['reason'] + ')' if r['reason'] else ''}; candidate "
        f"{r['candidate'] or '-'}; promotion to served on the replica: "
        f"{r['promotion_to_served_s'] if r['promotion_to_served_s'] is not None else '-'} s.",
    ]
    ev = r["evaluate"]
    if ev:
        lines.append(
            "- Gate figures: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, float))
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=64, help="prompts the labellers rank")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="cycle config: section.key=value")
    args = ap.parse_args()
    res = run(args)
    meta = {**machine(), "model": res["model"]}
    md = markdown(res, meta)
    out = write_results("cycle", {"meta": meta, "result": res}, md)
    print(md)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
