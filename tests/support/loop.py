"""The training loop's tests: a cycle as small as it goes, the environment and CLI runs of the
loop's processes, and what a finished cycle reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.records import ANSWERS, PROMPTS

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


def tiny_cycle_config(work_dir: Path, **over: Any) -> dict[str, Any]:
    """A cycle whose heavy steps are as small as they go (tiny models, a few steps), with a
    gate every candidate passes unless `over` says otherwise."""
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


def loop_env(redis_url: str, **extra: str) -> dict[str, str]:
    """This process's environment with the loop's short timings, `redis_url`, and `extra`."""
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


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`instructloop <args>` run to its end in the repository."""
    return subprocess.run(
        [sys.executable, "-m", "instructloop", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(pred: Any, timeout: float, what: str, poll: float = 0.5) -> Any:
    """The first truthy value of `pred()`, polled every `poll` seconds for `timeout`."""
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
