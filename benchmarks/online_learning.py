"""The online learning benchmark: does the product, run as a user runs it, get better from its
users' rankings while it keeps serving?

    python -m benchmarks.online_learning [--work-dir DIR] [--out PATH] [--quick] [key=value ...]

1. `instructloop up` as shipped (a private Redis, the default model, the server, the training
   worker and the beat), on a fresh data directory and free ports.
2. Idle: small streamed requests, one at a time, for the time to first token (TTFT) of a server
   with nothing else to do.
3. Before: the served v1's greedy answers over gRPC to the held-out split of the
   verifiable-instruction prompts (training/data/constraints.py), kept apart from the training
   prompts.
4. Feedback: simulated users ask for K candidates (T = 1) of training prompts and rank them by
   IFEval instructions followed (training/data/simulated_labeler.py, ties kept) with
   SubmitRanking; groups in which every candidate tied are not sent.
5. `instructloop cycle run --wait` on the real worker: snapshot -> reward model -> PPO-ptx ->
   evaluate -> gate -> promote. All along, a client streams the same small requests as in 2
   (TTFT under training and the swap) and users keep asking for completions; every RPC that
   fails is counted (a stream restarted by the swap is not a failure).
6. After: once the promoted version serves, its greedy answers to the same held-out prompts.

Reported: prompt- and instruction-level accuracy before and after with the paired gain, answer
length, the rate of formatting the prompts did not ask for, TTFT p50/p99 during the cycle against
idle, failed requests, and the time from the first ranking to the promoted version being served.
Every run, targets met or missed, is written to benchmarks/results/online_learning.json and .md
(or `--out`).

Targets on the default model, 2 cores: held-out prompt-level accuracy of the promoted version
>= v1's + 10 points; mean answer words >= 60% of v1's and < 5% of answers under 8 words;
unrequested formatting at most 5 points above v1's rate; 0 failed requests; TTFT p99 during the
cycle <= 1.5x idle; <= 60 minutes from the first ranking to the promoted version being served.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructloop.training.data.simulated_labeler import ranking_order

from benchmarks.common import REPO, RESULTS_DIR, machine, percentile

USER_KEY, ADMIN_KEY = "bench-key", "bench-admin"

# Short requests for the TTFT probes. They go out with logging disabled: a logged prompt joins
# the next snapshot's PPO prompt set (feedback/export.py), and the probes are not the users'.
PROBE_PROMPTS: tuple[str, ...] = (
    "Name a colour.",
    "Say hello in French.",
    "What is two plus two?",
    "Name an animal that can fly.",
    "Give me a word that rhymes with cat.",
    "Name a fruit.",
)

TARGET_GAIN_POINTS = 10.0
TARGET_MIN_WORDS_RATIO = 0.6
TARGET_MAX_SHARE_UNDER_8 = 0.05
TARGET_MAX_FORMATTING_RISE_POINTS = 5.0
TARGET_MAX_TTFT_P99_RATIO = 1.5
TARGET_MAX_SECONDS_TO_SERVED = 3600.0

EXIT_PROMOTED, EXIT_FAILED, EXIT_REJECTED = 0, 1, 3

# What the run imports from training/data to score the held-out answers.
SCORING_HELPERS: dict[str, tuple[str, ...]] = {
    "instructloop.training.data.constraints": (
        "accuracy",
        "paired_gain",
        "per_instruction_accuracy",
    ),
    "instructloop.training.data.simulated_users": (
        "answer_words",
        "unrequested_formatting_rate",
        "unrequested_formatting_by_feature",
    ),
}

OOM_MARKERS = ("out of memory", "oom-kill", "oom_reaper", "invoked oom-killer")


@dataclass
class OnlineLearningConfig:
    """Sizes and settings of one run. `up` and the cycle run with their shipped defaults unless
    `up_args` / `cycle_config` say otherwise."""

    work_dir: str = ""
    """Logs and the data directory (`<work_dir>/data`, which must not exist yet or be empty);
    "" = a fresh temporary directory."""
    seed: int = 0
    """Seed of the training and held-out prompt draws."""
    n_train_prompts: int = 512
    """Training prompts the simulated users ask about and rank (one K-way ranking each): the
    reward model's held-out accuracy, and with it what PPO can learn, grows with the rankings
    (benchmarks/HISTORY.md, "Learning")."""
    n_eval_prompts: int = 200
    """Held-out prompts answered greedily before and after: at 100 one accuracy's standard error
    is about 4.5 points against a 10-point target."""
    k: int = 4
    """Candidates per training prompt (InstructGPT ranks K = 4 to 9)."""
    sample_temperature: float = 1.0
    """Temperature of the ranked candidates (InstructGPT samples at 1)."""
    sample_max_tokens: int = 96
    """Length limit of the ranked candidates."""
    eval_max_tokens: int = 96
    """Length limit of the greedy held-out answers."""
    users: int = 16
    """Simulated users, round robin: the feedback rate limit is per user and minute."""
    concurrency: int = 8
    """Requests in flight at once while collecting feedback and held-out answers."""
    probe_max_tokens: int = 16
    """Length of the streamed TTFT probes."""
    probe_interval_s: float = 2.0
    """One probe starts this often (or as soon as the previous ends, if later). A light, steady
    load: on two cores vLLM's scheduler busy-waits while any request is in flight, and the
    training steps (at the lowest priority) get only what serving leaves."""
    idle_probes: int = 60
    """Probes of the idle phase."""
    idle_settle_s: float = 10.0
    """Pause before the idle probes, after two warm-up requests: the worker and beat have just
    started beside the server."""
    cycle_request_interval_s: float = 10.0
    """During the cycle, besides the probes, a user asks for K candidates of a training prompt
    this often (logged, as real traffic is)."""
    settle_after_served_s: float = 5.0
    """The probes go on this long after the promoted version serves (the swap's aftermath)."""
    max_cycles: int = 1
    """Cycles to try: after a rejected one, another round of feedback on new training prompts
    and another cycle, up to this many."""
    cycle_config: dict[str, Any] = field(default_factory=dict)
    """CycleConfig fields passed with `cycle run --config`; empty: the shipped defaults."""
    up_args: list[str] = field(default_factory=list)
    """Extra arguments of `instructloop up` (none: as shipped)."""
    startup_timeout_s: float = 1200.0
    """`up` must serve within this (it builds the default model in the fresh data directory)."""
    cycle_timeout_s: float = 7200.0
    """`cycle run --wait --timeout`."""
    served_timeout_s: float = 300.0
    """After a promotion, the promoted version must serve within this."""
    request_timeout_s: float = 600.0
    """Deadline of each RPC (requests wait, not fail, while a swap loads)."""
    stop_timeout_s: float = 180.0
    """`up` must stop this long after SIGINT (it stops the worker, beat and Redis)."""


def quick(cfg: OnlineLearningConfig) -> OnlineLearningConfig:
    """Tiny sizes and a tiny cycle that any candidate passes: checks the harness end to end
    (promotion and swap included), not the learning."""
    return dataclasses.replace(
        cfg,
        n_train_prompts=24,
        n_eval_prompts=16,
        sample_max_tokens=32,
        eval_max_tokens=32,
        idle_probes=10,
        idle_settle_s=2.0,
        cycle_config={
            "reward_model": {"epochs": 1},
            "ppo": {"total_episodes": 16, "batch_size": 8, "minibatch_size": 4},
            "evaluate": {"n_prompts": 8, "max_tokens": 32},
            "gate_min_win_rate_rm": 0.0,
            "gate_min_win_rate_judge": 0.0,
            "gate_max_ptx_loss_increase": 1e9,
            "gate_max_constraint_accuracy_drop": 1.0,
            **cfg.cycle_config,
        },
    )


def apply_overrides(cfg: OnlineLearningConfig, items: Sequence[str]) -> OnlineLearningConfig:
    """`key=value` assignments (value as JSON; strings may be bare) into a copy of `cfg`; dict
    fields are merged. A wrong key or type is an error: a typo must not run an hour with the
    wrong setting."""
    known = {f.name for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"not a field of OnlineLearningConfig: {item!r}")
        cur = getattr(cfg, key)
        try:
            value = raw if isinstance(cur, str) else json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(cur, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(cur):
            raise ValueError(f"{key} takes a JSON {type(cur).__name__}, got {raw!r}")
        changes[key] = {**cur, **value} if isinstance(cur, dict) else value
    return dataclasses.replace(cfg, **changes)


# --- pure helpers ---------------------------------------------------------------------------


def all_tied(ranks: Sequence[int]) -> bool:
    """Every candidate shares one rank: the group holds no comparison to learn from."""
    return len(set(ranks)) <= 1


def latency_summary(values: Sequence[float]) -> dict[str, Any]:
    """n, p50, p99, mean and max in seconds (nearest-rank percentiles); None where empty."""
    if not values:
        return {"n": 0, "p50_s": None, "p99_s": None, "mean_s": None, "max_s": None}
    return {
        "n": len(values),
        "p50_s": percentile(values, 50),
        "p99_s": percentile(values, 99),
        "mean_s": sum(values) / len(values),
        "max_s": max(values),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None where either is missing or the denominator is not positive."""
    if num is None or den is None or not den > 0 or math.isnan(num):
        return None
    return num / den


def targets(
    *,
    promoted: bool,
    gain_points: float | None,
    words_mean_before: float | None,
    words_mean_after: float | None,
    share_under_8_after: float | None,
    formatting_rate_before: float | None,
    formatting_rate_after: float | None,
    failed_requests: int,
    ttft_p99_idle_s: float | None,
    ttft_p99_cycle_s: float | None,
    first_ranking_to_served_s: float | None,
) -> dict[str, bool]:
    """The issue's targets, met or not; a figure the run could not measure (None, NaN) misses
    its target. Rates are shares (0 to 1); the gain is in prompt-level points."""
    ttft_ratio = ratio(ttft_p99_cycle_s, ttft_p99_idle_s)
    # NaN compares False, so only None needs a check of its own.
    gain_ok = promoted and gain_points is not None and gain_points >= TARGET_GAIN_POINTS
    words_ok = (
        words_mean_before is not None
        and words_mean_after is not None
        and words_mean_after >= TARGET_MIN_WORDS_RATIO * words_mean_before
    )
    short_ok = share_under_8_after is not None and share_under_8_after < TARGET_MAX_SHARE_UNDER_8
    # In points, rounded: 0.07 - 0.02 is 0.05000000000000001 and would miss "at most 5".
    fmt_ok = (
        formatting_rate_before is not None
        and formatting_rate_after is not None
        and round(100 * (formatting_rate_after - formatting_rate_before), 9)
        <= TARGET_MAX_FORMATTING_RISE_POINTS
    )
    time_ok = (
        first_ranking_to_served_s is not None
        and first_ranking_to_served_s <= TARGET_MAX_SECONDS_TO_SERVED
    )
    return {
        "promoted": promoted,
        "heldout_prompt_level_gain>=+10_points": gain_ok,
        "mean_words>=60%_of_v1": words_ok,
        "answers_under_8_words<5%": short_ok,
        "unrequested_formatting<=v1+5_points": fmt_ok,
        "failed_requests==0": failed_requests == 0,
        "ttft_p99_cycle<=1.5x_idle": ttft_ratio is not None
        and ttft_ratio <= TARGET_MAX_TTFT_P99_RATIO,
        "first_ranking_to_served<=60_min": time_ok,
    }


def cycle_summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The figures of a cycle record (`instructloop cycle status --json`) worth keeping."""
    steps = rec.get("steps") or {}
    outputs = rec.get("outputs") or {}
    created, finished = rec.get("created_at"), rec.get("finished_at")
    promote = steps.get("promote") or {}
    return {
        "id": rec.get("id"),
        "state": rec.get("state"),
        "reason": rec.get("reason") or "",
        "failed_step": rec.get("failed_step") or "",
        "parent_version": rec.get("parent_version") or "",
        "candidate_version": rec.get("candidate_version") or "",
        "seconds": None if created is None or finished is None else finished - created,
        "steps_s": {k: v.get("seconds") for k, v in steps.items()},
        "promoted_at": promote.get("finished_at") if rec.get("state") == "promoted" else None,
        "gate": outputs.get("gate") or {},
        "evaluate": (outputs.get("evaluate") or {}).get("metrics") or {},
        "reward_model": (outputs.get("reward_model") or {}).get("metrics") or {},
        "ppo": (outputs.get("ppo") or {}).get("metrics") or {},
    }


_DMESG_TIME = re.compile(r"^\[\s*(\d+(?:\.\d+)?)\]")


def oom_lines(dmesg_text: str, since_uptime_s: float) -> list[str]:
    """Kernel log lines about the OOM killer logged at or after `since_uptime_s` (seconds since
    boot, dmesg's own clock). A line without a timestamp cannot be placed in time and is kept."""
    found = []
    for line in dmesg_text.splitlines():
        if not any(m in line.lower() for m in OOM_MARKERS):
            continue
        m = _DMESG_TIME.match(line)
        if m is None or float(m.group(1)) >= since_uptime_s:
            found.append(line.strip())
    return found


def _fmt(x: float | None, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def markdown(r: dict[str, Any]) -> str:
    """A short report of one run (also of a run that stopped on an error)."""
    m = r.get("machine", {})
    acc = r.get("heldout_accuracy", {})
    words = r.get("answer_words", {})
    fmt = r.get("unrequested_formatting", {})
    versions = r.get("versions", {})
    lines = [
        "### Online learning benchmark (`instructloop up` as shipped)",
        "",
        f"{r.get('date', '?')}, {m.get('cpu', '?')} ({m.get('cores', '?')} cores, "
        f"{m.get('memory_gib', '?')} GiB; load average {_fmt(m.get('loadavg_1m'), '.1f')} at "
        f"the start){'; QUICK run: harness check only' if r.get('quick') else ''}.",
    ]
    if r.get("error"):
        lines += ["", f"**The run stopped on an error:** {r['error']}"]
    if r.get("scoring_error"):
        lines += ["", f"**Scoring the held-out answers failed:** {r['scoring_error']}"]
    if acc:
        lines += [
            "",
            "| version | held-out prompt-level | instruction-level | answer words (mean; < 8) "
            "| unrequested formatting |",
            "|---|---|---|---|---|",
        ]
    for key, label in (("before", "v1 (before)"), ("after", "after the cycle")):
        a, w, f = acc.get(key), words.get(key), fmt.get(key)
        if a is None:
            continue
        wtxt = f"{w['mean']:.1f}; {w['share_under_8']:.0%}" if w else "-"
        ftxt = f"{f['rate']:.1%}" if f and f.get("rate") is not None else "-"
        lines.append(
            f"| {label}: {versions.get(key, '?')} | {a['prompt_level']:.3f} | "
            f"{a['instruction_level']:.3f} | {wtxt} | {ftxt} |"
        )
    fb = r.get("feedback", {})
    gain = r.get("paired_gain")
    ttft = r.get("ttft", {})
    idle, cyc = ttft.get("idle", {}), ttft.get("cycle", {})
    failed = r.get("failed_requests", {})
    lines.append("")
    if gain:
        lines.append(
            f"- Prompt-level gain: {gain['points']:+.1f} ± {gain['standard_error_points']:.1f} "
            f"points (paired, {gain['gained']} prompts gained, {gain['lost']} lost, of "
            f"{gain['n_prompts']}; target ≥ +10)."
        )
    if fb:
        lines.append(
            f"- Feedback: {fb.get('rankings', 0)} K={r.get('config', {}).get('k')} rankings "
            f"from {fb.get('prompts', 0)} training prompts ({fb.get('all_tied', 0)} all-tied "
            f"groups not sent), {_fmt(fb.get('seconds'), '.0f')} s."
        )
    for c in r.get("cycles", []):
        steps = ", ".join(
            f"{k} {v:.0f}" for k, v in c.get("steps_s", {}).items() if isinstance(v, int | float)
        )
        gate = c.get("gate", {})
        checks = ", ".join(
            f"{k} {'ok' if ok else 'FAILED'}" for k, ok in gate.get("checks", {}).items()
        )
        lines.append(
            f"- Cycle {c.get('id', '?')}: {c.get('state', '?')} (exit {c.get('exit_code')})"
            f"{': ' + c['reason'] if c.get('reason') else ''}; "
            f"{_fmt(c.get('wall_s'), '.0f')} s{f' ({steps} s)' if steps else ''}"
            f"{'; gate: ' + checks if checks else ''}."
        )
    lines += [
        f"- TTFT ({r.get('config', {}).get('probe_max_tokens')}-token streams): idle p50 "
        f"{_fmt(idle.get('p50_s'), '.3f')} s, p99 {_fmt(idle.get('p99_s'), '.3f')} s "
        f"(n = {idle.get('n', 0)}); during the cycle p50 {_fmt(cyc.get('p50_s'), '.3f')} s, "
        f"p99 {_fmt(cyc.get('p99_s'), '.3f')} s (n = {cyc.get('n', 0)}, "
        f"{ttft.get('restarts', 0)} streams restarted by the swap): p99 ratio "
        f"{_fmt(ttft.get('p99_ratio'), '.2f')}x (target ≤ 1.5x).",
        f"- Failed requests: {failed.get('total', 0)}"
        + (
            " (" + ", ".join(f"{k} {v}" for k, v in failed.get("by_phase", {}).items()) + ")"
            if failed.get("total")
            else ""
        )
        + ".",
        f"- First ranking to the promoted version served: "
        f"{_fmt(r.get('first_ranking_to_served_s'), '.0f')} s (target ≤ 3600); promotion to "
        f"served {_fmt(r.get('promotion_to_served_s'), '.2f')} s.",
    ]
    up = r.get("up_exit", {})
    if up:
        oom = r.get("oom", {})
        lines.append(
            f"- `up` stopped by SIGINT: exit {up.get('exit_code')} after "
            f"{_fmt(up.get('seconds'), '.1f')} s"
            f"{' (did not stop in time: killed)' if up.get('forced') else ''}"
            f"{'; processes of its group were left and killed' if up.get('leftovers') else ''}"
            f"; OOM kills in the kernel log: "
            + (str(len(oom["lines"])) if oom.get("lines") is not None else "not readable")
            + "."
        )
    tg = r.get("targets", {})
    if tg:
        lines.append(
            "- Targets met: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in tg.items())
        )
    return "\n".join(lines) + "\n"


# --- the run --------------------------------------------------------------------------------


def _log(t0: float, msg: str) -> None:
    print(f"[online_learning {time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class UpProcess:
    """`instructloop up` in a process group of its own, its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        with log.open("wb") as f:  # the child holds its own descriptor
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGINT, as Ctrl-C: `up` stops the worker, beat and Redis itself. What it leaves of
        its process group, or a hang past `timeout`, is recorded, then killed."""
        t = time.monotonic()
        out: dict[str, Any] = {"exit_code": self.proc.poll(), "forced": False, "leftovers": False}
        if out["exit_code"] is None:
            os.kill(self.pid, signal.SIGINT)
            try:
                out["exit_code"] = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                out["forced"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
                out["exit_code"] = self.proc.returncode
        out["seconds"] = time.monotonic() - t
        # Its children (Redis, the engine, worker, beat) share the group: any left must go.
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.group_alive():
            out["leftovers"] = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
                time.sleep(5)
                os.killpg(self.pid, signal.SIGKILL)
        return out


def _uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_oom(since_uptime_s: float | None) -> dict[str, Any]:
    try:
        p = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"lines": None, "note": f"dmesg not run: {e}"}
    if p.returncode != 0:
        return {"lines": None, "note": f"dmesg exit {p.returncode}: {p.stderr.strip()[:200]}"}
    return {"lines": oom_lines(p.stdout, since_uptime_s or 0.0), "note": ""}


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    try:
        p = subprocess.run(
            [sys.executable, "-m", "instructloop", *args],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        return {"exit_code": None, "stdout": str(e.stdout or ""), "stderr": f"timed out: {e}"}
    return {"exit_code": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


@dataclass
class Failures:
    """Every RPC that did not end OK, by phase, with the first few messages."""

    by_phase: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, phase: str, err: BaseException) -> None:
        self.by_phase[phase] += 1
        if len(self.examples) < 20:
            code = getattr(err, "code", None)
            detail = getattr(err, "details", None)
            what = f"{code()} {detail()}" if callable(code) and callable(detail) else repr(err)
            self.examples.append(f"{phase}: {what}"[:300])

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())


@dataclass
class Probes:
    """TTFT samples of the streamed probes: [start time, TTFT s, version]."""

    samples: list[tuple[float, float, str]] = field(default_factory=list)
    restarts: int = 0

    def ttfts(self) -> list[float]:
        return [s[1] for s in self.samples]


class Session:
    """The gRPC side of a run: one channel, the stubs, the failure count."""

    def __init__(self, address: str, cfg: OnlineLearningConfig) -> None:
        import grpc

        from instructloop.v1 import (
            completion_pb2,
            completion_pb2_grpc,
            feedback_pb2,
            feedback_pb2_grpc,
            model_pb2,
            model_pb2_grpc,
        )

        self.cfg = cfg
        self.c, self.f, self.m = completion_pb2, feedback_pb2, model_pb2
        self.channel = grpc.aio.insecure_channel(address)
        self.completion = completion_pb2_grpc.CompletionServiceStub(self.channel)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.model = model_pb2_grpc.ModelServiceStub(self.channel)
        self.user_md = (("authorization", f"Bearer {USER_KEY}"),)
        self.admin_md = (("authorization", f"Bearer {ADMIN_KEY}"),)
        self.failures = Failures()

    async def close(self) -> None:
        await self.channel.close()

    def request(self, text: str, **kw: Any) -> Any:
        return self.c.CompletionRequest(
            messages=[self.c.ChatMessage(role="user", content=text)], **kw
        )

    async def complete(self, req: Any, phase: str, tries: int = 3) -> Any:
        """Complete, counting each failure; tried again so the phase still gets its answer."""
        for attempt in range(tries):
            try:
                return await self.completion.Complete(
                    req, metadata=self.user_md, timeout=self.cfg.request_timeout_s
                )
            except Exception as e:  # every non-OK status counts
                self.failures.add(phase, e)
                if attempt + 1 == tries:
                    raise
                await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    async def serving_version(self) -> str:
        sm = await self.model.GetServingModel(
            self.m.GetServingModelRequest(), metadata=self.admin_md, timeout=30
        )
        return str(sm.model.version)

    async def probe(self, i: int) -> tuple[float, str, int]:
        """One small streamed request: (TTFT, version, restarts). TTFT is the first token of the
        answer the client keeps: a restart (hot swap) drops what came before it."""
        req = self.request(
            PROBE_PROMPTS[i % len(PROBE_PROMPTS)],
            n=1, max_tokens=self.cfg.probe_max_tokens, temperature=0.0,
            user_id=f"probe-{i % self.cfg.users}", disable_logging=True,
        )  # fmt: skip
        t0 = time.perf_counter()
        ttft: float | None = None
        version, restarts = "", 0
        stream = self.completion.StreamComplete(
            req, metadata=self.user_md, timeout=self.cfg.request_timeout_s
        )
        async for chunk in stream:
            if chunk.restarted:
                restarts += 1
                ttft = None
            if ttft is None and any(d.text for d in chunk.choices):
                ttft = time.perf_counter() - t0
            version = chunk.model_version or version
        return (ttft if ttft is not None else time.perf_counter() - t0), version, restarts

    async def probe_loop(
        self, probes: Probes, phase: str, *, count: int | None = None, stop: Any = None
    ) -> None:
        """Probes one after another, one every probe_interval_s, until `count` or `stop`."""
        step = self.cfg.probe_interval_s
        t_next = time.monotonic()
        i = 0
        while (count is None or i < count) and not (stop is not None and stop.is_set()):
            delay = t_next - time.monotonic()
            if delay > 0:
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
            # A slow probe is not followed by a burst of catch-up probes.
            t_next = max(t_next + step, time.monotonic())
            started = time.time()
            try:
                ttft, version, restarts = await self.probe(i)
            except Exception as e:
                self.failures.add(phase, e)
            else:
                probes.samples.append((started, ttft, version))
                probes.restarts += restarts
            i += 1

    async def answers(self, prompts: Sequence[Any], phase: str) -> tuple[list[str], Counter[str]]:
        """Greedy answers to `prompts`, several in flight; not logged, so that held-out prompts
        never reach a snapshot's PPO prompt set. Returns the answers and the versions seen."""
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def one(i: int, p: Any) -> tuple[str, str]:
            async with sem:
                req = self.request(
                    p.prompt, n=1, max_tokens=self.cfg.eval_max_tokens, temperature=0.0,
                    user_id=f"eval-{i % self.cfg.users}", disable_logging=True,
                )  # fmt: skip
                r = await self.complete(req, phase)
                return r.choices[0].text, r.model_version

        got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return [t for t, _ in got], Counter(v for _, v in got)

    async def rank_and_submit(
        self, i: int, p: Any, tag: str, stats: dict[str, Any], phase: str
    ) -> None:
        """A simulated user asks for K candidates and ranks them (ties kept)."""
        from instructloop.training.data.simulated_labeler import rank

        cfg = self.cfg
        user = f"user-{i % cfg.users}"
        req = self.request(
            p.prompt, n=cfg.k, max_tokens=cfg.sample_max_tokens,
            temperature=cfg.sample_temperature, user_id=user,
        )  # fmt: skip
        resp = await self.complete(req, phase)
        texts = [ch.text for ch in resp.choices]
        r = rank(p, texts)
        stats["versions"][resp.model_version] += 1
        stats["instructions_met"] += sum(r.scores)
        stats["instructions_sampled"] += len(p.instruction_ids) * len(texts)
        order, ranks = ranking_order(texts, r.responses, r.ranks)
        if all_tied(ranks):
            stats["all_tied"] += 1
            return
        sub = self.f.SubmitRankingRequest(
            user_id=user, idempotency_key=f"{tag}-{i}", completion_id=resp.completion_id,
            ranked_response_ids=[resp.choices[j].response_id for j in order], ranks=ranks,
        )  # fmt: skip
        for attempt in range(3):  # the idempotency key makes a retry safe
            try:
                await self.feedback.SubmitRanking(
                    sub, metadata=self.user_md, timeout=cfg.request_timeout_s
                )
                break
            except Exception as e:
                self.failures.add(f"{phase}_submit", e)
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0)
        if stats["first_ack_at"] is None:
            stats["first_ack_at"] = time.time()
        stats["rankings"] += 1

    async def collect_feedback(self, prompts: Sequence[Any], tag: str) -> dict[str, Any]:
        sem = asyncio.Semaphore(self.cfg.concurrency)
        stats: dict[str, Any] = {
            "prompts": len(prompts), "rankings": 0, "all_tied": 0, "first_ack_at": None,
            "versions": Counter(), "instructions_met": 0, "instructions_sampled": 0,
        }  # fmt: skip
        t = time.time()

        async def guarded(i: int, p: Any) -> None:
            async with sem:
                await self.rank_and_submit(i, p, tag, stats, "feedback")

        await asyncio.gather(*(guarded(i, p) for i, p in enumerate(prompts)))
        stats["seconds"] = time.time() - t
        stats["versions"] = dict(stats["versions"])
        return stats

    async def user_traffic(self, prompts: Sequence[Any], stop: asyncio.Event) -> int:
        """Users keep asking (K candidates, logged) while the cycle runs; no feedback is sent,
        so the data the cycle trains on stays the snapshot's."""
        n = 0
        while not stop.is_set():
            p = prompts[n % len(prompts)]
            req = self.request(
                p.prompt, n=self.cfg.k, max_tokens=self.cfg.sample_max_tokens,
                temperature=self.cfg.sample_temperature, user_id=f"user-{n % self.cfg.users}",
            )  # fmt: skip
            try:
                await self.completion.Complete(
                    req, metadata=self.user_md, timeout=self.cfg.request_timeout_s
                )
            except Exception as e:
                self.failures.add("cycle_traffic", e)
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.cycle_request_interval_s)
        return n

    async def wait_serving(self, version: str | None, not_version: str, timeout: float) -> float:
        """time.time() when this replica serves `version` (or, unnamed, anything but
        `not_version`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                v = await self.serving_version()
            except Exception as e:
                self.failures.add("model_service", e)
                v = ""
            if v and (v == version if version else v != not_version):
                return time.time()
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{version or 'a new version'} not served after {timeout:.0f} s")


async def _run_cycle(
    cfg: OnlineLearningConfig, env: dict[str, str], work: Path, idx: int, up: UpProcess
) -> dict[str, Any]:
    """`instructloop cycle run --wait` as a user runs it; then its record."""
    cmd = [sys.executable, "-m", "instructloop", "cycle", "run", "--wait",
           "--timeout", str(cfg.cycle_timeout_s)]  # fmt: skip
    if cfg.cycle_config:
        path = work / "cycle-config.json"
        path.write_text(json.dumps(cfg.cycle_config, indent=1))
        cmd += ["--config", str(path)]
    log = work / f"cycle-{idx}.log"
    t = time.time()
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=err
        )
        comm = asyncio.ensure_future(proc.communicate())
        while True:
            done, _ = await asyncio.wait({comm}, timeout=5)
            if done:
                break
            if not up.alive():  # nothing will finish the cycle now
                proc.kill()
                await comm
                raise RuntimeError(f"instructloop up exited during the cycle:\n{up.tail()}")
        out, _ = comm.result()
    stdout = out.decode(errors="replace")
    with log.open("a") as f:
        f.write(f"\n--- stdout\n{stdout}")
    # `cycle run` prints the id first (cyc-...); anything else on stdout is not the id.
    cycle_id = next((ln.strip() for ln in stdout.splitlines() if ln.startswith("cyc-")), "")
    res: dict[str, Any] = {"exit_code": proc.returncode, "wall_s": time.time() - t, "log": str(log)}
    if cycle_id:
        st = await asyncio.to_thread(_cli, ["cycle", "status", cycle_id, "--json"], env)
        try:
            res.update(cycle_summary(json.loads(st["stdout"])))
        except ValueError:
            res["status_error"] = (st["stdout"] + st["stderr"])[-2000:]
    return res


async def _session(
    cfg: OnlineLearningConfig,
    address: str,
    env: dict[str, str],
    work: Path,
    up: UpProcess,
    result: dict[str, Any],
    t0: float,
) -> None:
    """Phases 2-6 over one gRPC channel; fills `result` as it goes (a failed run keeps what it
    measured)."""
    from instructloop.training.data.constraints import generate_prompts

    s = Session(address, cfg)
    result["_session"] = s
    phases = result["seconds"]
    try:
        v1 = await s.serving_version()
        result["versions"] = {"before": v1}
        eval_p = generate_prompts(cfg.n_eval_prompts, "heldout", seed=cfg.seed)
        train_p = generate_prompts(cfg.n_train_prompts, "train", seed=cfg.seed)
        result["prompts"] = {"train": len(train_p), "heldout": len(eval_p)}

        # -- idle TTFT
        t = time.time()
        for i in range(2):  # warm-up: the first requests' one-off costs are not the idle figure
            try:
                await s.probe(i)
            except Exception as e:
                s.failures.add("warmup", e)
        await asyncio.sleep(cfg.idle_settle_s)
        idle = result["_idle"] = Probes()
        await s.probe_loop(idle, "idle_probe", count=cfg.idle_probes)
        phases["idle_ttft"] = time.time() - t
        _log(t0, f"idle TTFT p99 {latency_summary(idle.ttfts())['p99_s']}")

        # -- before
        t = time.time()
        before, seen = await s.answers(eval_p, "eval_before")
        phases["eval_before"] = time.time() - t
        result["_answers"] = {"before": before}
        result["eval_versions"] = {"before": dict(seen)}
        _log(t0, f"{len(before)} held-out answers from {dict(seen)}")

        # -- feedback, cycle(s)
        load = Probes()
        result["_cycle_probes"] = load
        result["cycles"] = []
        result["feedback_rounds"] = []
        first_ack: float | None = None
        promoted: str | None = None
        for idx in range(cfg.max_cycles):
            prompts = (
                train_p
                if idx == 0
                else generate_prompts(cfg.n_train_prompts, "train", seed=cfg.seed + 1000 * idx)
            )
            _log(t0, f"round {idx}: {len(prompts)} training prompts, K = {cfg.k}")
            fb = await s.collect_feedback(prompts, f"r{idx}")
            result["feedback_rounds"].append(fb)
            first_ack = first_ack or fb["first_ack_at"]
            result["first_ranking_at"] = first_ack
            phases[f"feedback_{idx}"] = fb["seconds"]
            _log(t0, f"{fb['rankings']} rankings sent, {fb['all_tied']} all tied")

            stop = asyncio.Event()
            bg = [
                asyncio.create_task(s.probe_loop(load, "cycle_probe", stop=stop)),
                asyncio.create_task(s.user_traffic(prompts, stop)),
            ]
            t = time.time()
            try:
                _log(t0, "cycle run --wait")
                cyc = await _run_cycle(cfg, env, work, idx, up)
                result["cycles"].append(cyc)
                _log(t0, f"cycle {cyc.get('id')}: {cyc.get('state')} (exit {cyc['exit_code']})")
                if cyc["exit_code"] == EXIT_PROMOTED:
                    served_at = await s.wait_serving(
                        cyc.get("candidate_version") or None, v1, cfg.served_timeout_s
                    )
                    promoted = await s.serving_version()
                    if first_ack is not None:
                        result["first_ranking_to_served_s"] = served_at - first_ack
                    if cyc.get("promoted_at"):
                        result["promotion_to_served_s"] = served_at - cyc["promoted_at"]
                    await asyncio.sleep(cfg.settle_after_served_s)
            finally:
                stop.set()
                got = await asyncio.gather(*bg, return_exceptions=True)
                phases[f"cycle_{idx}"] = time.time() - t
            result.setdefault("cycle_user_requests", 0)
            result["cycle_user_requests"] += got[1] if isinstance(got[1], int) else 0
            if promoted or cyc["exit_code"] != EXIT_REJECTED:
                break

        # -- after
        t = time.time()
        after, seen = await s.answers(eval_p, "eval_after")
        phases["eval_after"] = time.time() - t
        result["_answers"]["after"] = after
        result["eval_versions"]["after"] = dict(seen)
        result["versions"]["after"] = next(iter(seen)) if len(seen) == 1 else dict(seen)
        result["_eval_prompts"] = eval_p
    finally:
        await s.close()


def run(cfg: OnlineLearningConfig) -> dict[str, Any]:
    """One run; the result holds whatever was measured, and `error` when it stopped early."""
    from benchmarks.serving import wait_grpc
    from instructloop.redis_server import free_port
    from instructloop.running import read_running

    # A scoring helper missing fails the run here, not after the hour it measures.
    for module, names in SCORING_HELPERS.items():
        mod = importlib.import_module(module)
        missing = [n for n in names if not hasattr(mod, n)]
        if missing:
            raise ImportError(f"{module} lacks {', '.join(missing)}")

    t0 = time.time()
    since_boot = _uptime()
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="instructloop-online-")).resolve()
    data = work / "data"
    if data.exists() and any(data.iterdir()):
        raise ValueError(f"{data} is not empty: the run needs a fresh data directory")
    data.mkdir(parents=True, exist_ok=True)
    # As a user's shell would have it, with the benchmark's keys; no REDIS_URL, so `up` starts
    # its private Redis and every other verb finds the loop through `up`'s record.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        INSTRUCTLOOP_DATA_DIR=str(data),
        INSTRUCTLOOP_API_KEYS=USER_KEY,
        INSTRUCTLOOP_ADMIN_KEYS=ADMIN_KEY,
    )
    ports = {"grpc": free_port(), "metrics": free_port(), "worker_metrics": free_port()}
    cmd = [
        sys.executable, "-m", "instructloop", "up",
        "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
        "--worker-metrics-port", str(ports["worker_metrics"]), *cfg.up_args,
    ]  # fmt: skip
    result: dict[str, Any] = {
        "benchmark": "online_learning",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "config": dataclasses.asdict(cfg),
        "work_dir": str(work),
        "logs": {"up": str(work / "up.log")},
        "up_command": cmd[1:],
        "seconds": {},
        "error": None,
    }
    _log(t0, f"work dir {work}; starting instructloop up (gRPC port {ports['grpc']})")
    up = UpProcess(cmd, env, work / "up.log")
    try:
        t = time.time()
        deadline = time.monotonic() + cfg.startup_timeout_s
        loop = None
        while loop is None:
            if not up.alive():
                raise RuntimeError(f"instructloop up exited ({up.proc.returncode}):\n{up.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no record of `up` after {cfg.startup_timeout_s} s")
            loop = read_running(data)
            if loop is None:
                time.sleep(1.0)
        result["running"] = dataclasses.asdict(loop)
        port = int(loop.grpc.rpartition(":")[2])
        wait_grpc(port, up, timeout=max(1.0, deadline - time.monotonic()))  # type: ignore[arg-type]
        result["seconds"]["startup"] = time.time() - t
        _log(t0, f"serving at {loop.grpc} after {time.time() - t:.0f} s")
        asyncio.run(_session(cfg, loop.grpc, env, work, up, result, t0))
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        _log(t0, f"stopped: {result['error']}")
        if not isinstance(e, Exception):
            raise
    finally:
        if up.alive():
            result["status"] = _cli(["status"], env)
            # A cycle the beat started on its own would share the cores with the measurements.
            result["cycles_listed"] = _cli(["cycle", "status", "--list", "10"], env)
        result["loadavg_end"] = os.getloadavg()
        t = time.time()
        result["up_exit"] = up.stop(cfg.stop_timeout_s)
        result["seconds"]["stop"] = time.time() - t
        result["oom"] = _read_oom(since_boot)
        _finish(result)
        result["seconds"]["total"] = time.time() - t0
    return result


def _finish(result: dict[str, Any]) -> None:
    """Turn what the session gathered into the result's figures and targets (in place)."""
    s = result.pop("_session", None)
    idle: Probes = result.pop("_idle", None) or Probes()
    load: Probes = result.pop("_cycle_probes", None) or Probes()
    answers: dict[str, list[str]] = result.pop("_answers", {})
    eval_p = result.pop("_eval_prompts", None)
    failures: Failures = s.failures if s is not None else Failures()

    idle_s, cycle_s = latency_summary(idle.ttfts()), latency_summary(load.ttfts())
    result["ttft"] = {
        "idle": idle_s,
        "cycle": cycle_s,
        "p50_ratio": ratio(cycle_s["p50_s"], idle_s["p50_s"]),
        "p99_ratio": ratio(cycle_s["p99_s"], idle_s["p99_s"]),
        "restarts": load.restarts + idle.restarts,
        # Every probe of the cycle as [start (epoch s), TTFT s, version], to line the tail up
        # with the cycle record's step times (training or the swap).
        "cycle_samples": [[round(t, 2), round(x, 4), v] for t, x, v in load.samples],
    }
    result["failed_requests"] = {
        "total": failures.total,
        "by_phase": dict(failures.by_phase),
        "examples": failures.examples,
    }
    rounds = result.get("feedback_rounds", [])
    if rounds:
        met = sum(r["instructions_met"] for r in rounds)
        sampled = sum(r["instructions_sampled"] for r in rounds)
        result["feedback"] = {
            "prompts": sum(r["prompts"] for r in rounds),
            "rankings": sum(r["rankings"] for r in rounds),
            "all_tied": sum(r["all_tied"] for r in rounds),
            "seconds": sum(r["seconds"] for r in rounds),
            "sampled_instruction_rate": met / sampled if sampled else None,
        }
    cycles = result.get("cycles", [])
    promoted = any(c.get("exit_code") == EXIT_PROMOTED for c in cycles)

    # The raw answers too: they can be scored again without another hour's run.
    result["heldout_answers"] = answers
    figures: dict[str, Any] = dict.fromkeys(
        (
            "gain_points",
            "words_mean_before",
            "words_mean_after",
            "share_under_8_after",
            "formatting_rate_before",
            "formatting_rate_after",
        )
    )
    try:
        _scores(result, eval_p, answers, figures)
    except Exception as e:  # the run's other figures still get written
        result["scoring_error"] = f"{type(e).__name__}: {e}"
    result["targets"] = targets(
        promoted=promoted,
        failed_requests=failures.total,
        ttft_p99_idle_s=idle_s["p99_s"],
        ttft_p99_cycle_s=cycle_s["p99_s"],
        first_ranking_to_served_s=result.get("first_ranking_to_served_s"),
        **figures,
    )
    result["all_targets_met"] = all(result["targets"].values()) and result["error"] is None


def _scores(
    result: dict[str, Any],
    eval_p: Sequence[Any] | None,
    answers: dict[str, list[str]],
    figures: dict[str, Any],
) -> None:
    """Accuracy, gain, length and formatting of the held-out answers into `result`, and the
    figures the targets need into `figures`, each as soon as it is known (a helper that fails
    leaves those before it); nothing unless both versions answered."""
    from instructloop.training.data.constraints import (
        accuracy,
        paired_gain,
        per_instruction_accuracy,
    )

    if eval_p is None or "before" not in answers or "after" not in answers:
        return
    result["sample_answers"] = [
        {"prompt": p.prompt, **{k: v[i] for k, v in answers.items()}}
        for i, p in enumerate(eval_p[:6])
    ]
    acc = {k: accuracy(eval_p, v) for k, v in answers.items()}
    gain = paired_gain(acc["before"], acc["after"])
    result["heldout_accuracy"] = {k: v.to_json() for k, v in acc.items()}
    result["paired_gain"] = gain.to_json()
    figures["gain_points"] = gain.points
    result["per_instruction"] = {k: per_instruction_accuracy(eval_p, v) for k, v in answers.items()}

    from instructloop.training.data.simulated_users import answer_words

    words: dict[str, dict[str, float]] = {}
    for k, ans in answers.items():
        w = answer_words(ans)
        words[k] = {"mean": float(w["mean"]), "share_under_8": float(w["share_under_8"])}
    result["answer_words"] = words
    figures["words_mean_before"] = words["before"]["mean"]
    figures["words_mean_after"] = words["after"]["mean"]
    figures["share_under_8_after"] = words["after"]["share_under_8"]

    from instructloop.training.data.simulated_users import (
        unrequested_formatting_by_feature,
        unrequested_formatting_rate,
    )

    # Rate: among held-out prompts that ask for no formatting, the share of answers with some;
    # by feature: among prompts that did not ask for that feature, the share showing it.
    fmt = {
        k: {
            "rate": float(unrequested_formatting_rate(eval_p, ans)),
            "by_feature": unrequested_formatting_by_feature(eval_p, ans),
        }
        for k, ans in answers.items()
    }
    result["unrequested_formatting"] = fmt
    figures["formatting_rate_before"] = fmt["before"]["rate"]
    figures["formatting_rate_after"] = fmt["after"]["rate"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Fields (key=JSON value): "
        + ", ".join(f.name for f in dataclasses.fields(OnlineLearningConfig)),
    )
    ap.add_argument("--work-dir", default="", help="logs and the fresh data directory")
    ap.add_argument("--out", default=str(RESULTS_DIR / "online_learning.json"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness only")
    ap.add_argument("overrides", nargs="*", help="OnlineLearningConfig fields as key=JSON")
    args = ap.parse_args(argv)
    cfg = OnlineLearningConfig(work_dir=args.work_dir)
    if args.quick:
        cfg = quick(cfg)
    try:
        cfg = apply_overrides(cfg, args.overrides)
    except ValueError as e:
        ap.error(str(e))
    result = run(cfg)
    result["quick"] = args.quick
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"written: {out}")
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
