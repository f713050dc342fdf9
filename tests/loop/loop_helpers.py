"""Helpers for the training-loop tests: tiny models, seeded feedback, real worker processes.

Imported by name (pytest puts this directory on sys.path; the directory has no __init__.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructloop.training.cycle import _die_with_parent

from instructloop.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]

# Short broker timings so a crashed step is redelivered within the test: every tiny step ends
# well inside STEP_LIMIT_S, and VISIBILITY_S exceeds it (as LoopConfig demands).
STEP_LIMIT_S = 540
VISIBILITY_S = 570
LOOP_ENV = {
    "INSTRUCTLOOP_STEP_TIME_LIMIT_S": str(STEP_LIMIT_S),
    "INSTRUCTLOOP_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "INSTRUCTLOOP_RESTORE_INTERVAL_S": "1",
    "INSTRUCTLOOP_HEARTBEAT_S": "1",
    "INSTRUCTLOOP_BEAT_LOCK_TTL_S": "3",
}


def build_tiny_llama(out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (tied embeddings, as SmolLM2) with the default
    model's tokenizer and chat template, in float32 (so vLLM and transformers compute alike).
    Head size 32: one vLLM's CPU attention supports."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,  # the evaluation sampler asks for 2048
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config.dtype = torch.float32
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copyfile(tokenizer_from / name, out / name)
    return out


ANSWER_SET = ("Yes.", "No.", "Maybe, it depends.", "I am not sure about that at all.")


def build_tiny_answerer(
    out: Path, tokenizer_from: Path, topics: list[str], steps: int = 120, seed: int = 0
) -> Path:
    """The tiny Llama taught (causal-LM loss on the answer, chat template applied) to answer
    "Tell me about <topic>." with one of ANSWER_SET, each about equally often at T = 1: a policy
    with a real choice to make (1, 1, 3 or 7 words), small enough to train in a test."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_llama(out, tokenizer_from, seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(16):
            msgs = [{"role": "user", "content": f"Tell me about {rng.choice(topics)}."}]
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            p_ids = tok(prompt, add_special_tokens=False).input_ids
            a_ids = tok(rng.choice(ANSWER_SET) + tok.eos_token, add_special_tokens=False).input_ids
            rows.append((p_ids, a_ids))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.full_like(ids, -100)
        for i, (p_ids, a_ids) in enumerate(rows):
            seq = p_ids + a_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            target[i, len(p_ids) - 1 : len(seq) - 1] = torch.tensor(a_ids)  # next-token targets
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        sel = target != -100  # the head only where there is a target: 49k-way logits are dear
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[sel]), target[sel])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


PROMPTS = [
    "Name a colour.",
    "Say something about the sea.",
    "Give me a word that rhymes with cat.",
    "What is two plus two?",
    "Write one short line about Redis.",
    "Name an animal that can fly.",
    "Describe rain in three words.",
    "Recommend a book.",
]
ANSWERS = ["blue", "It is a big blue sea.", "hat", "four", "Redis is fast.", "a bird"]


def seed_feedback(redis_url: str, n: int = 8, k: int = 4, prefix: str = "il:") -> list[str]:
    """Log `n` completions of k responses and rank each (shorter answers first: a
    programmatic preference); returns the feedback ids."""
    from instructloop.feedback.config import StoreConfig
    from instructloop.feedback.records import CompletionRecord, ResponseRecord, new_id
    from instructloop.feedback.store import FeedbackStore

    async def go() -> list[str]:
        store = FeedbackStore.from_url(
            redis_url, StoreConfig(key_prefix=prefix, rate_limit_per_minute=0)
        )
        fb_ids = []
        try:
            for i in range(n):
                prompt = PROMPTS[i % len(PROMPTS)]
                texts = [ANSWERS[(i + j) % len(ANSWERS)] + " " * j for j in range(k)]
                now = time.time()
                rec = CompletionRecord(
                    completion_id=new_id("cmpl"),
                    model_version="v1",
                    user_id=f"user-{i % 3}",
                    prompt=None,
                    messages=[{"role": "user", "content": prompt}],
                    prompt_text=f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
                    prompt_token_ids=[1, 2, 3],
                    sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "n": k},
                    metadata={},
                    created_at=now,
                    finished_at=now,
                    responses=[
                        ResponseRecord(new_id("resp"), j, texts[j], [5, 6], "stop", 2)
                        for j in range(k)
                    ],
                )
                await store.log_completion(rec)
                order = sorted(range(k), key=lambda j: (len(texts[j].strip()), j))
                ack = await store.submit_ranking(
                    user_id=rec.user_id,
                    idempotency_key=None,
                    completion_id=rec.completion_id,
                    ranked_response_ids=[rec.responses[j].response_id for j in order],
                )
                fb_ids.append(ack.feedback_id)
        finally:
            await store.close()
        return fb_ids

    return asyncio.run(go())


def tiny_cycle_config(work_dir: Path, **over: Any) -> dict[str, Any]:
    """A cycle whose heavy steps are as small as they go (tiny models, a few steps), with a
    gate every candidate passes unless `over` says otherwise."""
    import json

    ptx = work_dir.parent / "ptx_heldout.jsonl"  # a small held-out corpus of our own
    ptx.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"{q} {a}"} for q, a in zip(PROMPTS, ANSWERS, strict=False)]
    ptx.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg: dict[str, Any] = {
        "work_dir": str(work_dir),
        "min_feedback": 1,
        "recipe": "instructgpt",  # the stage defaults; the tiny sizes below override them
        "reward_model": {"batch_size": 2, "max_length": 64, "epochs": 1, "device": "cpu"},
        "ppo": {
            "total_episodes": 4,
            "batch_size": 4,
            "minibatch_size": 2,
            "max_new_tokens": 8,
            "max_prompt_length": 64,
            "gamma_ptx": 1.0,
            "ptx_batch_size": 2,
            "ptx_max_length": 32,
            "warmup_steps": 0,
            "device": "cpu",
        },
        "evaluate": {
            "n_prompts": 6,
            "max_tokens": 16,
            "batch_size": 4,
            "device": "cpu",
            "ptx_path": str(ptx),
        },
        "gate_min_win_rate_rm": 0.0,
        "gate_min_win_rate_judge": 0.0,
        "gate_max_ptx_loss_increase": 1e9,
        "gate_max_constraint_accuracy_drop": 1.0,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "instructloop", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def loop_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LOOP_ENV)
    env.update(
        REDIS_URL=redis_url,
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


@dataclass
class WorkerProc:
    """`instructloop worker` in its own process group (so a kill takes its children too)."""

    redis_url: str
    log_path: Path
    pool: str = "prefork"
    metrics_port: int = field(default_factory=free_port)
    cpus: set[int] | None = None
    """Run the worker (and every training step it starts) on these CPUs only, as on a machine
    of its own (its vLLM engines bound there too)."""
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> WorkerProc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        name = f"test-{uuid.uuid4().hex[:6]}@%h"
        cmd = [
            sys.executable, "-m", "instructloop", "worker",
            "--pool", self.pool, "--metrics-port", str(self.metrics_port),
            "--hostname", name, "--loglevel", "INFO",
        ]  # fmt: skip
        env = loop_env(self.redis_url)
        cpus = self.cpus
        if cpus is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cpus)))
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"

        def preexec() -> None:
            _die_with_parent()  # a killed test run leaves no worker taking tasks
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        log.close()
        start_size = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")[start_size:]
            if " ready." in text:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{text[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process, pool child, step subprocess)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass
        self.proc = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            return str(r.read().decode())


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels must all match)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


def wait_for(pred: Any, timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def cycle_story(work_dir: Path) -> str:
    """What a finished cycle's steps reported, in a few lines (for a failure message): the reward
    model's held-out accuracy, PPO's per-step score, KL and response length and any early stop,
    and the evaluation's RM win rate. A weak result says here which stage it came from."""
    import json

    lines = []
    for cyc in sorted(work_dir.glob("cyc-*")):
        for step in ("reward_model", "ppo", "evaluate"):
            for res in sorted(cyc.glob(f"{step}/attempt-*/result.json")):
                m = json.loads(res.read_text()).get("result", {}).get("metrics", {})
                keep = {k: round(v, 3) for k, v in m.items() if isinstance(v, float)
                        and k in ("val_accuracy", "val_pairs", "reference_std", "steps",
                                  "first_reward", "final_reward", "win_rate_rm")}  # fmt: skip
                lines.append(f"{cyc.name} {step} {res.parent.name}: {keep}")
        for log in sorted(cyc.glob("ppo/attempt-*/model.metrics.jsonl")):
            rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            lines.append(
                "  ppo per step (score, kl_k3, response_length): "
                + " ".join(
                    f"{r.get('step')}:({r.get('score', 0):.2f},{r.get('kl_k3', 0):.2f},"
                    f"{r.get('response_length', 0):.1f})"
                    for r in rows
                )
                + "".join(f" early_stop={r['early_stop']}" for r in rows if "early_stop" in r)
            )
    return "\n".join(lines) or f"no cycle under {work_dir}"
