"""The whole loop, end to end, on the real parts: the service gets better from its users'
feedback while it serves.

1. The live service (InstructloopServer on vLLM, following the registry) serves a policy that
   has a real choice to make: a tiny Llama taught to answer "Tell me about X." with one of four
   answers of 1, 1, 3 and 7 words (support.models.build_tiny_answerer; the default model would
   take an hour here, see benchmarks/learning/). Simulated users ask it for n=4 candidates
   over gRPC and rank them by a programmatic preference (fewer words is better), with
   SubmitRanking.
2. A cycle runs on a real `instructloop worker` process (Celery, Redis broker): snapshot ->
   reward model -> PPO-ptx -> evaluate -> gate -> promote.
3. Clients keep calling the service all along; the served version changes under that load and
   not one request fails.
4. On held-out prompts the new version's answers beat the old version's under the users'
   preference (win rate over all pairs of samples, ties half).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from instructloop.registry import ModelRegistry
from instructloop.v1 import (
    completion_pb2,
    completion_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)
from tests.support.loop import REPO, cli, cycle_story, loop_env
from tests.support.metrics import metric_value
from tests.support.models import ANSWER_SET, build_tiny_answerer
from tests.support.server import Served, running_server

pytestmark = pytest.mark.slow

TOPICS = [
    "the ocean", "autumn", "coffee", "the moon", "trains", "mountains", "honey bees", "rain",
    "chess", "bread", "the violin", "volcanoes", "owls", "winter", "gardens", "bicycles",
    "lighthouses", "deserts", "whales", "libraries", "clocks", "rivers", "snow", "kites",
]  # fmt: skip
HELD_OUT = [
    "tea", "forests", "the sun", "boats", "cats", "music", "stars", "islands",
    "tigers", "paper", "bridges", "storms",
]  # fmt: skip
K = 4
MAX_TOKENS = 16
# Serving and training on machines of their own, as in production: on a small machine vLLM's
# "auto" binding puts every engine on the first core, and a serving engine under load keeps a
# core busy (its workers poll), so the two would starve each other.
_CPUS = sorted(os.sched_getaffinity(0))
SERVING_CPU = str(_CPUS[-1])
TRAINING_CPUS = set(_CPUS[:-1]) or set(_CPUS)


class Stubs:
    def __init__(self, ch: grpc.aio.Channel) -> None:
        self.completion = completion_pb2_grpc.CompletionServiceStub(ch)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(ch)
        self.model = model_pb2_grpc.ModelServiceStub(ch)


def ask(topic: str) -> str:
    return f"Tell me about {topic}."


def words(text: str) -> int:
    return len(text.split())


def preference_order(texts: list[str]) -> list[int]:
    """The simulated users' ranking, best first: fewer words wins (index breaks ties)."""
    return sorted(range(len(texts)), key=lambda j: (words(texts[j]), j))


def _req(topic: str, seed: int, **kw: Any) -> completion_pb2.CompletionRequest:
    kw.setdefault("max_tokens", MAX_TOKENS)
    return completion_pb2.CompletionRequest(
        messages=[completion_pb2.ChatMessage(role="user", content=ask(topic))],
        temperature=1.0, seed=seed, **kw,
    )  # fmt: skip


async def sample(s: Served, ch: grpc.aio.Channel, topics: list[str], seed: int) -> dict:
    """K answers per topic from the live service: {topic: (version, [texts])}."""
    st = Stubs(ch)
    out = {}
    for i, t in enumerate(topics):
        r = await st.completion.Complete(_req(t, seed + i, n=K, disable_logging=True),
                                         metadata=s.user_md)  # fmt: skip
        out[t] = (r.model_version, [c.text for c in r.choices])
    return out


def win_rate(new: list[str], old: list[str]) -> float:
    """Share of (new, old) sample pairs the users prefer new in; ties count half."""
    score = 0.0
    for a in new:
        for b in old:
            score += 1.0 if words(a) < words(b) else 0.5 if words(a) == words(b) else 0.0
    return score / (len(new) * len(old))


def cycle_config(work: Path) -> dict[str, Any]:
    """Real stages sized for the tiny policy (learning rates to match its size); the gate
    passes any candidate, because this test measures the improvement itself, through the
    service.

    Three settings differ from the defaults' spirit, each for a failure seen in seed sweeps
    (RM and PPO seeds 0-6, the PPO per-step log printed by `cycle_story`):
    - γ_ptx 0.1, not 1.0: the ptx corpus here is the users' prompts ("Tell me about X."), text
      the tiny answerer never learned to write (LM loss 7 nats at the start, against a policy
      loss of a few hundredths); at 1.0 its gradient pulled the policy toward writing prompts,
      with per-sequence KL spikes of 13 and 36 nats (one stopped the run by kl_stop).
    - β (kl_coef) 0.5, not the paper's 0.02: this reference is near-deterministic after the first
      token and the small RM's scores, divided by their tiny spread on the reference (0.006-0.09),
      reach the ±5 clip, so at 0.02 the KL cost nothing: two seeds found a response outside
      the four answers that the RM scores +2 to +3 and held it 6-12 nats from the reference
      (answers 1.73 words, win rate 0.609, just over the bar; a CI run's candidate, 3.52 words
      and 0.586, was not logged). At 0.5 that costs more than it pays; the honest move (a
      1-word answer, about 1.4 nats) still pays.
    - 24 steps at lr 1e-3, not 8 at 3e-3: fewer KL spikes, and room to recover from one.
    """
    return {
        "work_dir": str(work),
        "min_feedback": 8,
        "recipe": "instructgpt",  # the stage defaults, sized for the tiny answerer below
        "reward_model": {"epochs": 4, "lr": 1e-3, "batch_size": 8, "max_length": 96,
                         "device": "cpu"},
        "ppo": {
            "total_episodes": 384, "batch_size": 16, "minibatch_size": 8, "ppo_epochs": 2,
            "lr": 1e-3, "critic_lr": 3e-3, "kl_coef": 0.5, "warmup_steps": 0,
            "max_new_tokens": MAX_TOKENS,
            "max_prompt_length": 96, "gamma_ptx": 0.1, "ptx_batch_size": 2,
            "ptx_max_length": 32, "device": "cpu", "seed": 0,
        },
        "evaluate": {"n_prompts": 4, "max_tokens": 16, "batch_size": 4, "device": "cpu"},
        "gate_min_win_rate_rm": 0.0,
        "gate_min_win_rate_judge": 0.0,
        "gate_max_ptx_loss_increase": 1e9,
        "gate_max_constraint_accuracy_drop": 1.0,
    }  # fmt: skip


async def constant_load(s: Served, stop: asyncio.Event, seen: list[str], errors: list[Any]):
    """A client that never pauses for long: short completions, one after another."""
    async with grpc.aio.insecure_channel(s.address) as ch:
        st = Stubs(ch)
        n = 0
        while not stop.is_set():
            try:
                r = await st.completion.Complete(
                    _req(TOPICS[n % len(TOPICS)], n, max_tokens=8), metadata=s.user_md
                )
                seen.append(r.model_version)
            except Exception as e:  # each one fails the test below
                errors.append(e)
            n += 1
            await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def answerer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_answerer(tmp_path_factory.mktemp("answerer") / "policy", model_dir, TOPICS)


async def test_feedback_improves_the_served_policy_under_load(
    redis_client: Any, redis_url: str, answerer: Path, worker_factory: Any, tmp_path: Path
) -> None:
    reg = ModelRegistry(redis_url)
    v1 = reg.ensure_live(answerer).version
    async with running_server(
        None, redis_url, follow_live=True, swap_poll_s=1.0, feedback_rate_limit_per_minute=0,
        dtype="float32", max_model_len=1024,
        cpu_omp_threads_bind=SERVING_CPU,
    ) as s:  # fmt: skip
        assert s.engine.model_version == v1
        async with grpc.aio.insecure_channel(s.address) as ch:
            st = Stubs(ch)
            before = await sample(s, ch, HELD_OUT, seed=10_000)
            answers = {x for _, xs in before.values() for x in xs}
            assert len(answers & set(ANSWER_SET)) >= 3, answers  # the choice is really there
            # 1. users ask for K candidates and rank them (the paper's K-way rankings)
            for i, topic in enumerate(TOPICS * 2):
                resp = await st.completion.Complete(
                    _req(topic, i, n=K, user_id=f"user-{i % 5}"), metadata=s.user_md
                )
                order = preference_order([c.text for c in resp.choices])
                await st.feedback.SubmitRanking(
                    feedback_pb2.SubmitRankingRequest(
                        user_id=f"user-{i % 5}", idempotency_key=f"rank-{i}",
                        completion_id=resp.completion_id,
                        ranked_response_ids=[resp.choices[j].response_id for j in order],
                    ),
                    metadata=s.user_md,
                )  # fmt: skip

            # 2. + 3. a cycle on a real worker while clients keep calling
            worker = worker_factory(cpus=TRAINING_CPUS)
            stop = asyncio.Event()
            seen: list[str] = []
            errors: list[Any] = []
            load = [asyncio.create_task(constant_load(s, stop, seen, errors))]
            cfg = tmp_path / "cycle.json"
            cfg.write_text(json.dumps(cycle_config(tmp_path / "cycles")))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "instructloop", "cycle", "run", "--wait",
                "--timeout", "2400", "--config", str(cfg),
                env=loop_env(redis_url), cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            try:
                assert proc.returncode == 0, (
                    f"{out.decode()}\n{err.decode()}\n{worker.log()[-4000:]}"
                )
                live = reg.live()
                assert live is not None and live.version != v1 and live.parent == v1
                for _ in range(600):  # the server swaps on the registry's notification
                    if s.engine.model_version == live.version:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(3.0)  # and keeps serving under the load
            finally:
                stop.set()
                await asyncio.gather(*load)
            assert not errors, errors[:3]
            assert seen[0] == v1 and seen[-1] == live.version, (seen[0], seen[-1])
            sm = await st.model.GetServingModel(
                model_pb2.GetServingModelRequest(), metadata=s.admin_md
            )
            assert sm.model.version == sm.live_version == live.version
            assert metric_value(worker.metrics(), "instructloop_cycles_total",
                                outcome="promoted") == 1.0  # fmt: skip
            if int(SERVING_CPU) not in TRAINING_CPUS:
                # Serving first yields only to replicas on the step's own cores: pinned apart,
                # the load never paused training.
                rec = json.loads(cli("cycle", "status", "--json", env=loop_env(redis_url)).stdout)
                for step in ("reward_model", "ppo"):
                    assert rec["steps"][step]["summary"]["pauses_for_serving"] == 0, rec["steps"]

            # 4. the new version against the old, on held-out prompts, by the users' preference
            after = await sample(s, ch, HELD_OUT, seed=10_000)
    reg.close()
    assert {v for v, _ in before.values()} == {v1}
    assert {v for v, _ in after.values()} == {live.version}
    rate = sum(win_rate(after[t][1], before[t][1]) for t in HELD_OUT) / len(HELD_OUT)
    mean_words = {
        name: sum(words(x) for _, xs in d.values() for x in xs) / (K * len(HELD_OUT))
        for name, d in (("before", before), ("after", after))
    }
    print(f"\nheld-out win rate of {live.version} over {v1}: {rate:.3f}; words {mean_words}")
    assert rate > 0.6, (rate, mean_words, cycle_story(tmp_path / "cycles"))
