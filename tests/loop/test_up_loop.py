"""The loop as a user runs it: `instructloop up` with its shipped memory plan, clients streaming
completions for the whole of a cycle, and the other verbs finding the loop by themselves.

No test-only memory setting: the serving KV cache is the plan's, the heavy steps check the
recipe's memory needs, run at the lowest priority and pause while the streams are in flight.
Only the cycle's sizes are small (a few PPO steps), so that it fits the suite; the shipped
recipe's whole run is benchmarks/online_learning/.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructloop.paths import DEFAULT_MODEL_NAME
from instructloop.redis_server import free_port
from instructloop.running import read_running
from instructloop.training.data.constraints import generate_prompts
from instructloop.training.data.simulated_labeler import rank, ranking_order
from instructloop.v1 import (
    completion_pb2,
    completion_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)
from tests.support.prometheus import Scraper, dashboard_queries
from tests.support.server import RECONNECT_EVERY_SECOND

USER, ADMIN = "up-user", "up-admin"
K = 4


def _verb(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "instructloop", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _wait_serving(ch: grpc.Channel, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "not SERVING in time"
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(1)


def _rank_some(ch: grpc.Channel, n: int) -> int:
    """Simulated users: K candidates per training prompt, ranked and submitted."""
    comp = completion_pb2_grpc.CompletionServiceStub(ch)
    fb = feedback_pb2_grpc.FeedbackServiceStub(ch)
    md = [("authorization", f"Bearer {USER}")]
    sent = 0
    for i, p in enumerate(generate_prompts(n, "train", seed=3)):
        resp = comp.Complete(
            completion_pb2.CompletionRequest(
                messages=[completion_pb2.ChatMessage(role="user", content=p.prompt)],
                n=K, max_tokens=48, temperature=1.0, user_id=f"user-{i % 4}",
            ),
            metadata=md,
        )  # fmt: skip
        texts = [c.text for c in resp.choices]
        r = rank(p, texts)
        order, ranks = ranking_order(texts, r.responses, r.ranks)
        if len(set(ranks)) == 1:
            continue
        fb.SubmitRanking(
            feedback_pb2.SubmitRankingRequest(
                user_id=f"user-{i % 4}", idempotency_key=f"r-{i}",
                completion_id=resp.completion_id,
                ranked_response_ids=[resp.choices[j].response_id for j in order], ranks=ranks,
            ),
            metadata=md,
        )  # fmt: skip
        sent += 1
    return sent


class StreamingClients:
    """Streams small completions, one every few seconds per client, until stopped; every failed
    call is kept. (vLLM's engine busy-waits while a request is in flight and for a second after
    its last step: streams less than a second apart keep it spinning on a core for good, and the
    training steps, at the lowest priority, then get almost no CPU on two cores.)"""

    def __init__(self, address: str, n: int = 1, pause_s: float = 5.0) -> None:
        self.pause_s = pause_s
        self.address = address
        self.stop = threading.Event()
        self.ok = 0
        self.restarted = 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        md = [("authorization", f"Bearer {USER}")]
        with grpc.insecure_channel(self.address) as ch:
            stub = completion_pb2_grpc.CompletionServiceStub(ch)
            while not self.stop.is_set():
                req = completion_pb2.CompletionRequest(
                    messages=[completion_pb2.ChatMessage(role="user", content="Name a colour.")],
                    max_tokens=16,
                    temperature=0.0,
                    disable_logging=True,
                )
                try:
                    for chunk in stub.StreamComplete(req, metadata=md, timeout=120):
                        self.restarted += int(chunk.restarted)
                        if chunk.model_version:
                            self.versions.add(chunk.model_version)
                    self.ok += 1
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code()}: {e.details()}")
                self.stop.wait(self.pause_s)

    def __enter__(self) -> StreamingClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.timeout(2700)  # a whole cycle beside a serving engine on two cores
def test_up_as_shipped_keeps_serving_through_a_cycle(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    # The default model where `up` looks for it (built once per machine by the fixture).
    (data / "models" / DEFAULT_MODEL_NAME).symlink_to(model_dir, target_is_directory=True)
    drop = ("REDIS_URL", "INSTRUCTLOOP_KV_CACHE_GIB", "VLLM_CPU_KVCACHE_SPACE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        INSTRUCTLOOP_DATA_DIR=str(data), INSTRUCTLOOP_API_KEYS=USER, INSTRUCTLOOP_ADMIN_KEYS=ADMIN
    )
    port, mport, wport = free_port(), free_port(), free_port()
    log_path = tmp_path / "up.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "instructloop", "up", "--grpc-port", str(port),
         "--metrics-port", str(mport), "--worker-metrics-port", str(wport),
         "--http-port", str(free_port())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        with contextlib.ExitStack() as stack:
            ch = stack.enter_context(grpc.insecure_channel(address, options=RECONNECT_EVERY_SECOND))
            _wait_serving(ch, proc, log_path)
            text = log_path.read_text()
            assert "memory: serving KV cache" in text and "(planned: 1/12 of" in text, text[-3000:]

            # Every verb finds the loop through the record `up` keeps (no Redis URL given).
            loop = read_running(data)
            assert loop is not None and loop.pid == proc.pid and loop.grpc == address
            # A real Prometheus scrapes the server, the worker and Redis all along, as the
            # deployment's does; the dashboard's queries are checked against it at the end.
            prom = stack.enter_context(Scraper(
                tmp_path / "prometheus",
                {"instructloop-serving": [f"127.0.0.1:{mport}"],
                 "instructloop-worker": [f"127.0.0.1:{wport}"]},
                loop.redis_url,
            ))  # fmt: skip
            assert loop.memory["serving_kv_cache_gib"] >= 1
            st = _verb("status", env=env)
            assert st.returncode == 0, st.stderr
            assert "serving: live v1" in st.stdout and f"v1 on {address}" in st.stdout, st.stdout
            assert "cycle: none running" in st.stdout

            sent = _rank_some(ch, 16)
            assert sent >= 4
            sent += _replay_and_reject(ch)
            exp = _verb("feedback", "export", "--out", str(tmp_path / "export"), env=env)
            assert exp.returncode == 0, exp.stderr
            assert f"rankings {sent}," in exp.stdout, exp.stdout
            models = _verb("model", "list", env=env)
            assert models.returncode == 0 and models.stdout.startswith("* v1"), models.stdout
            cfg = tmp_path / "cycle.json"
            cfg.write_text(json.dumps({
                "min_feedback": 4,
                "reward_model": {"epochs": 1},
                "ppo": {"total_episodes": 32, "batch_size": 16, "minibatch_size": 8},
                "evaluate": {"n_prompts": 8, "max_tokens": 32},
            }))  # fmt: skip
            with StreamingClients(address) as clients:
                run = _verb("cycle", "run", "--wait", "--config", str(cfg), env=env, timeout=3000)
                assert proc.poll() is None, log_path.read_text()[-3000:]
            assert run.returncode in (0, 3), run.stdout + run.stderr  # promoted or rejected
            assert clients.failures == [], clients.failures[:5]
            assert clients.ok > 10  # streams kept coming for the whole cycle

            rec = json.loads(_verb("cycle", "status", "--json", env=env).stdout)
            assert rec["state"] in ("promoted", "rejected")
            for step in ("reward_model", "ppo"):
                s = rec["steps"][step]
                assert s["progress"]["step"] == s["progress"]["total"] > 0, s
                assert s["summary"]["niceness"] == 19 and s["summary"]["oom_score_adj"] == 1000
                # Serving first: the streams paused the step, and it finished all the same.
                assert s["summary"]["pauses_for_serving"] > 0, s["summary"]
                assert s["summary"]["paused_for_serving_s"] > 0, s["summary"]
            if rec["state"] == "promoted":
                want = rec["candidate_version"]
                sm_stub = model_pb2_grpc.ModelServiceStub(ch)
                deadline = time.monotonic() + 60
                while True:
                    sm = sm_stub.GetServingModel(
                        model_pb2.GetServingModelRequest(),
                        metadata=[("authorization", f"Bearer {ADMIN}")],
                    )
                    if sm.model.version == want or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                assert sm.model.version == want
            # No OOM kill, no engine death: the engine never restarted.
            st = json.loads(_verb("status", "--json", env=env).stdout)
            assert st["recent"][0]["id"] == rec["id"]
            assert all(r["engine_up"] for r in st["serving"]["replicas"])
            metrics = _metrics(mport)
            assert metrics.get("instructloop_engine_restarts_total", 0.0) == 0.0
            assert metrics.get("instructloop_engine_up") == 1.0
            # Every panel of the shipped dashboard has data from this one loop.
            time.sleep(3)  # a scrape after the last change
            assert set(prom.up().values()) == {1.0}, prom.up()
            # (vLLM's own `vllm:*` panel aside: `up`'s server does not export them yet, though
            # `serve`'s does, tests/serving/test_serving_auth_admin.py)
            queries = [(t, q) for t, q in dashboard_queries() if "vllm:" not in q]
            empty = [(t, q) for t, q in queries if not prom.query(q)]
            assert not empty, empty
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        log.close()
    assert rc == 0, log_path.read_text()[-3000:]
    assert read_running(data, check_alive=False) is None  # the record goes with the loop


def _replay_and_reject(ch: grpc.Channel) -> int:
    """A client retry (an idempotent replay, acknowledged again) and a forged ranking (refused):
    what the dashboard's feedback panels count. Returns the rankings stored (one)."""
    comp = completion_pb2_grpc.CompletionServiceStub(ch)
    fb = feedback_pb2_grpc.FeedbackServiceStub(ch)
    md = [("authorization", f"Bearer {USER}")]
    resp = comp.Complete(completion_pb2.CompletionRequest(prompt="Hello", n=2, max_tokens=4),
                         metadata=md)  # fmt: skip
    ids = [c.response_id for c in resp.choices]
    req = feedback_pb2.SubmitRankingRequest(
        user_id="retry", idempotency_key="replayed", completion_id=resp.completion_id,
        ranked_response_ids=ids,
    )  # fmt: skip
    first, again = fb.SubmitRanking(req, metadata=md), fb.SubmitRanking(req, metadata=md)
    assert first.feedback_id == again.feedback_id
    forged = feedback_pb2.SubmitRankingRequest(
        user_id="forger", completion_id=resp.completion_id, ranked_response_ids=["resp-x", ids[0]]
    )
    with pytest.raises(grpc.RpcError) as e:
        fb.SubmitRanking(forged, metadata=md)
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    return 1


def _metrics(port: int) -> dict[str, Any]:
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("instructloop_engine_") and " " in line:
            name, _, value = line.rpartition(" ")
            out[name.split("{", 1)[0]] = float(value)
    return out
