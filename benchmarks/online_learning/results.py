"""What a run gathered, turned into the result's figures and targets (also for a run that
stopped early: whatever it measured is kept)."""

from __future__ import annotations

from typing import Any

from benchmarks.online_learning.client import Failures
from benchmarks.online_learning.heldout import scores
from benchmarks.online_learning.measures import latency_summary, ratio, targets
from benchmarks.online_learning.probes import Probes
from benchmarks.online_learning.product import EXIT_PROMOTED


def finish(result: dict[str, Any]) -> None:
    """Turn what the session gathered into the result's figures and targets (in place)."""
    s = result.pop("_session", None)
    idle: Probes = result.pop("_idle", None) or Probes()
    load: Probes = result.pop("_cycle_probes", None) or Probes()
    traffic: Probes = result.pop("_traffic", None) or Probes()
    answers: dict[str, list[str]] = result.pop("_answers", {})
    eval_p = result.pop("_eval_prompts", None)
    failures: Failures = s.failures if s is not None else Failures()

    idle_s, cycle_s = latency_summary(idle.ttfts()), latency_summary(load.ttfts())
    traffic_s = latency_summary(traffic.ttfts())
    result["ttft"] = {
        "idle": idle_s,
        "traffic": traffic_s,
        "cycle": cycle_s,
        "p50_ratio": ratio(cycle_s["p50_s"], idle_s["p50_s"]),
        "p99_ratio": ratio(cycle_s["p99_s"], idle_s["p99_s"]),
        "p99_ratio_vs_traffic": ratio(cycle_s["p99_s"], traffic_s["p99_s"]),
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
        result["feedback"] = _feedback_totals(rounds)
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
        scores(result, eval_p, answers, figures)
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


def _feedback_totals(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The feedback rounds added up."""
    met = sum(r["instructions_met"] for r in rounds)
    sampled = sum(r["instructions_sampled"] for r in rounds)
    return {
        "prompts": sum(r["prompts"] for r in rounds),
        "rankings": sum(r["rankings"] for r in rounds),
        "all_tied": sum(r["all_tied"] for r in rounds),
        "seconds": sum(r["seconds"] for r in rounds),
        "sampled_instruction_rate": met / sampled if sampled else None,
    }
