"""The run's figures from what it gathered, and the targets they meet or miss: pure functions."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from benchmarks.common import percentile

TARGET_GAIN_POINTS = 10.0
TARGET_MIN_WORDS_RATIO = 0.6
TARGET_MAX_SHARE_UNDER_8 = 0.05
TARGET_MAX_FORMATTING_RISE_POINTS = 5.0
TARGET_MAX_TTFT_P99_RATIO = 1.5
TARGET_MAX_SECONDS_TO_SERVED = 3600.0

OOM_MARKERS = ("out of memory", "oom-kill", "oom_reaper", "invoked oom-killer")


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
