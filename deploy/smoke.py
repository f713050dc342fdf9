"""The compose deployment's smoke run, from the host: feedback in over gRPC, a cycle run in the
worker container, and the new version served by both replicas.

    INSTRUCTLOOP_API_KEYS=u INSTRUCTLOOP_ADMIN_KEYS=a docker compose -f deploy/compose.yaml \
        --profile cpu up -d
    INSTRUCTLOOP_API_KEY=u INSTRUCTLOOP_ADMIN_KEY=a python deploy/smoke.py

Needs the client and gRPC health (`pip install ./client grpcio-health-checking`). `--compose`
names the compose command (`docker compose`, `podman compose`). Exit 0: both replicas serve the
promoted version; 3: the gate rejected the candidate (the loop ran, nothing to swap); 1: a
failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from instructloop_client.v1 import (
    completion_pb2,
    completion_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

COMPOSE_FILE = Path(__file__).with_name("compose.yaml")
# A short cycle: enough to exercise every step on a CPU box within minutes, not to learn much.
SMOKE_CYCLE = {
    "min_feedback": 8,
    "reward_model": {"epochs": 1},
    "ppo": {"total_episodes": 32, "batch_size": 16, "minibatch_size": 8},
    "evaluate": {"n_prompts": 8, "max_tokens": 32},
}
TOPICS = ["the sea", "autumn", "bread", "owls", "rivers", "chess", "snow", "kites", "tea", "rain"]


def wait_serving(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        while True:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{address} is not SERVING after {timeout:.0f} s")
            time.sleep(2)


def served(address: str, admin: list[tuple[str, str]]) -> str:
    with grpc.insecure_channel(address) as ch:
        sm = model_pb2_grpc.ModelServiceStub(ch).GetServingModel(
            model_pb2.GetServingModelRequest(), metadata=admin, timeout=10
        )
    return sm.model.version


def give_feedback(address: str, user: list[tuple[str, str]], n: int) -> int:
    """n prompts, 4 candidates each, ranked by a simulated user (shorter first)."""
    with grpc.insecure_channel(address) as ch:
        comp = completion_pb2_grpc.CompletionServiceStub(ch)
        fb = feedback_pb2_grpc.FeedbackServiceStub(ch)
        for i in range(n):
            msg = completion_pb2.ChatMessage(
                role="user", content=f"Tell me about {TOPICS[i % 10]}."
            )
            resp = comp.Complete(
                completion_pb2.CompletionRequest(messages=[msg], n=4, max_tokens=32,
                                                 temperature=1.0, user_id=f"smoke-{i % 4}"),
                metadata=user, timeout=300,
            )  # fmt: skip
            order = sorted(resp.choices, key=lambda c: (len(c.text.split()), c.index))
            fb.SubmitRanking(
                feedback_pb2.SubmitRankingRequest(
                    user_id=f"smoke-{i % 4}", idempotency_key=f"smoke-{resp.completion_id}",
                    completion_id=resp.completion_id,
                    ranked_response_ids=[c.response_id for c in order],
                ),
                metadata=user, timeout=30,
            )  # fmt: skip
    return n


def compose(cmd: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    argv = [*shlex.split(cmd), "-f", str(COMPOSE_FILE), *args]
    return subprocess.run(argv, text=True, check=False, **kw)  # type: ignore[call-overload]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--replicas", nargs="+", default=["127.0.0.1:50051", "127.0.0.1:50052"])
    ap.add_argument("--compose", default="docker compose")
    ap.add_argument("--worker", default="worker", help="the worker's service (worker-gpu on GPU)")
    ap.add_argument("--feedback", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args()
    user = [("authorization", f"Bearer {os.environ['INSTRUCTLOOP_API_KEY']}")]
    admin = [("authorization", f"Bearer {os.environ['INSTRUCTLOOP_ADMIN_KEY']}")]

    for a in args.replicas:
        wait_serving(a, 900)
    before = {a: served(a, admin) for a in args.replicas}
    print(f"serving: {before}")
    print(f"feedback: {give_feedback(args.replicas[0], user, args.feedback)} rankings")

    cfg = "/tmp/smoke-cycle.json"
    write = compose(args.compose, "exec", "-T", args.worker, "sh", "-c", f"cat > {cfg}",
                    input=json.dumps(SMOKE_CYCLE))  # fmt: skip
    if write.returncode != 0:
        return 1
    run = compose(args.compose, "exec", "-T", args.worker, "instructloop", "cycle", "run",
                  "--wait", "--config", cfg, "--timeout", str(args.timeout))  # fmt: skip
    if run.returncode == 3:
        print("the gate rejected the candidate: nothing to swap")
        return 3
    if run.returncode != 0:
        print(f"cycle failed (exit {run.returncode})")
        return 1
    deadline = time.monotonic() + 300
    while True:
        now = {a: served(a, admin) for a in args.replicas}
        if len(set(now.values())) == 1 and set(now.values()) != set(before.values()):
            print(f"both replicas serve {next(iter(now.values()))} (were {before})")
            return 0
        if time.monotonic() > deadline:
            print(f"replicas did not converge on the new version: {now}")
            return 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
