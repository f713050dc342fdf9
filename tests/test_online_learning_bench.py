"""The online learning benchmark's pure parts (benchmarks/online_learning/): a ranking mapped
back to response ids, latency summaries, the targets, the cycle record's summary, the kernel
log's OOM lines, the config overrides and the report. Hand-made inputs; no engine, no Redis."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks.common import apply_overrides
from benchmarks.online_learning.config import OnlineLearningConfig, quick
from benchmarks.online_learning.measures import (
    cycle_summary,
    latency_summary,
    oom_lines,
    ratio,
    targets,
)
from benchmarks.online_learning.report import markdown
from benchmarks.online_learning.users import all_tied
from instructloop.training.data.simulated_labeler import ranking_order


def test_ranking_order_maps_equal_texts_to_distinct_responses() -> None:
    candidates = ["a", "b", "a", "c"]
    order, ranks = ranking_order(candidates, ["a", "a", "c", "b"], [1, 1, 2, 3])
    assert order == [0, 2, 3, 1]
    assert ranks == [1, 1, 2, 3]
    assert sorted(order) == [0, 1, 2, 3]


def test_ranking_order_refuses_what_it_cannot_map() -> None:
    with pytest.raises(ValueError, match="not among"):
        ranking_order(["a", "b"], ["a", "z"], [1, 2])
    with pytest.raises(ValueError, match="not among"):  # one "a" cannot be ranked twice
        ranking_order(["a", "b"], ["a", "a"], [1, 2])
    with pytest.raises(ValueError):
        ranking_order(["a", "b", "c"], ["a", "b"], [1, 2])


def test_ranking_order_with_the_simulated_labeller() -> None:
    from instructloop.training.data.constraints import ConstraintPrompt
    from instructloop.training.data.simulated_labeler import rank

    p = ConstraintPrompt(
        id="t",
        prompt="Describe tea in a few sentences. Do not use any commas.",
        instruction_ids=("punctuation:no_comma",),
        kwargs=({},),
        subject="tea",
    )
    comma = "Tea is a warm drink, loved by many people around the world every day."
    texts = [
        comma,
        "Tea is a warm drink loved by many people around the world every day.",
        comma,  # the same text sampled twice: two responses, two ids
        "Tea is a calm drink that many people enjoy every single morning at home.",
    ]
    r = rank(p, texts)
    order, ranks = ranking_order(texts, r.responses, r.ranks)
    ids = [f"resp-{i}" for i in range(len(texts))]
    assert [ids[j] for j in order] == ["resp-1", "resp-3", "resp-0", "resp-2"]
    assert ranks == [1, 1, 2, 2]
    assert not all_tied(ranks)
    assert all_tied([1, 1, 1, 1])


def test_latency_summary_nearest_rank() -> None:
    s = latency_summary([float(x) for x in range(100, 0, -1)])
    assert (s["n"], s["p50_s"], s["p99_s"], s["max_s"]) == (100, 50.0, 99.0, 100.0)
    assert s["mean_s"] == pytest.approx(50.5)
    assert latency_summary([]) == {
        "n": 0, "p50_s": None, "p99_s": None, "mean_s": None, "max_s": None
    }  # fmt: skip


def test_ratio_missing_or_zero_is_none() -> None:
    assert ratio(0.3, 0.2) == pytest.approx(1.5)
    assert ratio(None, 0.2) is None
    assert ratio(0.3, None) is None
    assert ratio(0.3, 0.0) is None
    assert ratio(math.nan, 0.2) is None


def _figures(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "promoted": True,
        "gain_points": 12.0,
        "words_mean_before": 50.0,
        "words_mean_after": 31.0,
        "share_under_8_after": 0.04,
        "formatting_rate_before": 0.10,
        "formatting_rate_after": 0.14,
        "failed_requests": 0,
        "ttft_p99_idle_s": 0.20,
        "ttft_p99_cycle_s": 0.29,
        "first_ranking_to_served_s": 3500.0,
    }
    base.update(over)
    return base


def test_targets_all_met() -> None:
    t = targets(**_figures())
    assert all(t.values()), t
    assert len(t) == 8


@pytest.mark.parametrize(
    ("over", "missed"),
    [
        ({"gain_points": 9.5}, "heldout_prompt_level_gain>=+10_points"),
        ({"words_mean_after": 29.0}, "mean_words>=60%_of_v1"),
        ({"share_under_8_after": 0.05}, "answers_under_8_words<5%"),
        ({"formatting_rate_after": 0.16}, "unrequested_formatting<=v1+5_points"),
        ({"failed_requests": 1}, "failed_requests==0"),
        ({"ttft_p99_cycle_s": 0.31}, "ttft_p99_cycle<=1.5x_idle"),
        ({"ttft_p99_cycle_s": None}, "ttft_p99_cycle<=1.5x_idle"),
        ({"first_ranking_to_served_s": 3601.0}, "first_ranking_to_served<=60_min"),
        ({"first_ranking_to_served_s": None}, "first_ranking_to_served<=60_min"),
        ({"gain_points": math.nan}, "heldout_prompt_level_gain>=+10_points"),
    ],
)
def test_each_target_can_miss_alone(over: dict[str, Any], missed: str) -> None:
    t = targets(**_figures(**over))
    assert [k for k, ok in t.items() if not ok] == [missed]


def test_targets_boundaries() -> None:
    # exactly 60% of v1's words, exactly 5 points more formatting (0.07 - 0.02 is not 0.05 in
    # floating point), exactly 1.5x TTFT, exactly 60 minutes: all met
    t = targets(
        **_figures(
            words_mean_after=30.0,
            formatting_rate_before=0.02,
            formatting_rate_after=0.07,
            ttft_p99_cycle_s=0.3,
            first_ranking_to_served_s=3600.0,
            gain_points=10.0,
        )
    )
    assert all(t.values()), t


def test_no_promotion_misses_the_gain_whatever_the_figure() -> None:
    t = targets(**_figures(promoted=False, gain_points=15.0))
    assert not t["promoted"]
    assert not t["heldout_prompt_level_gain>=+10_points"]


def test_cycle_summary() -> None:
    rec = {
        "id": "cyc-1",
        "state": "promoted",
        "reason": "",
        "failed_step": "",
        "parent_version": "v1",
        "candidate_version": "v2",
        "created_at": 1000.0,
        "finished_at": 1600.0,
        "steps": {
            "snapshot": {"state": "done", "seconds": 1.5},
            "promote": {"state": "done", "seconds": 0.2, "finished_at": 1599.0},
        },
        "outputs": {
            "gate": {"passed": True, "checks": {"win_rate_rm": True}, "version": "v2"},
            "evaluate": {"metrics": {"win_rate_rm": 0.61}},
        },
    }
    s = cycle_summary(rec)
    assert s["seconds"] == 600.0
    assert s["steps_s"] == {"snapshot": 1.5, "promote": 0.2}
    assert s["promoted_at"] == 1599.0
    assert s["candidate_version"] == "v2"
    assert s["gate"]["passed"] and s["evaluate"] == {"win_rate_rm": 0.61}
    rejected = cycle_summary({**rec, "state": "rejected", "finished_at": None})
    assert rejected["promoted_at"] is None and rejected["seconds"] is None
    assert cycle_summary({})["steps_s"] == {}


def test_oom_lines_since_the_start() -> None:
    text = "\n".join(
        [
            "[  100.000000] python invoked oom-killer: gfp_mask=0x140cca",
            "[  200.500000] Out of memory: Killed process 4242 (python)",
            "[  201.000000] eth0: link up",
            "[  300.000000] oom_reaper: reaped process 4242 (python)",
            "python invoked oom-killer: no timestamp",
        ]
    )
    found = oom_lines(text, since_uptime_s=150.0)
    assert found == [
        "[  200.500000] Out of memory: Killed process 4242 (python)",
        "[  300.000000] oom_reaper: reaped process 4242 (python)",
        "python invoked oom-killer: no timestamp",
    ]
    assert oom_lines("[ 5.0] all quiet", 0.0) == []


def test_apply_overrides() -> None:
    cfg = OnlineLearningConfig()
    got = apply_overrides(
        cfg,
        ["n_train_prompts=64", "probe_interval_s=1", "work_dir=/tmp/x",
         'cycle_config={"ppo": {"total_episodes": 64}}', 'up_args=["--dtype", "float32"]'],
    )  # fmt: skip
    assert got.n_train_prompts == 64
    assert got.probe_interval_s == 1.0 and isinstance(got.probe_interval_s, float)
    assert got.work_dir == "/tmp/x"
    assert got.cycle_config == {"ppo": {"total_episodes": 64}}
    assert got.up_args == ["--dtype", "float32"]
    assert cfg.n_train_prompts == OnlineLearningConfig().n_train_prompts != 64  # left alone
    with pytest.raises(ValueError, match="not a field"):
        apply_overrides(cfg, ["n_train=3"])
    with pytest.raises(ValueError, match="takes a JSON int"):
        apply_overrides(cfg, ["k=four"])
    with pytest.raises(ValueError, match="takes a JSON int"):
        apply_overrides(cfg, ["k=4.5"])


def test_quick_is_small_and_keeps_cycle_overrides() -> None:
    q = quick(OnlineLearningConfig(cycle_config={"min_feedback": 4}))
    assert q.n_train_prompts < 64 and q.n_eval_prompts < 64 and q.eval_max_tokens <= 32
    assert q.cycle_config["min_feedback"] == 4
    assert q.cycle_config["gate_min_win_rate_rm"] == 0.0


def _result() -> dict[str, Any]:
    acc = {"prompt_level": 0.3, "instruction_level": 0.5}
    return {
        "date": "today",
        "machine": {"cpu": "cpu", "cores": 2, "memory_gib": 24.0, "loadavg_1m": 0.5},
        "config": {"k": 4, "probe_max_tokens": 16},
        "versions": {"before": "v1", "after": "v2"},
        "heldout_accuracy": {"before": acc, "after": {**acc, "prompt_level": 0.45}},
        "answer_words": {
            "before": {"mean": 50.0, "share_under_8": 0.0},
            "after": {"mean": 40.0, "share_under_8": 0.02},
        },
        "unrequested_formatting": {"before": {"rate": 0.1}, "after": {"rate": 0.12}},
        "paired_gain": {
            "points": 15.0,
            "standard_error_points": 4.0,
            "gained": 20,
            "lost": 5,
            "n_prompts": 100,
        },
        "feedback": {"prompts": 256, "rankings": 190, "all_tied": 66, "seconds": 300.0},
        "cycles": [
            {
                "id": "cyc-1",
                "state": "promoted",
                "exit_code": 0,
                "wall_s": 1800.0,
                "steps_s": {"ppo": 900.0},
                "gate": {"checks": {"win_rate_rm": True}},
            },
        ],
        "ttft": {
            "idle": {"n": 60, "p50_s": 0.1, "p99_s": 0.2},
            "cycle": {"n": 3000, "p50_s": 0.15, "p99_s": 0.4},
            "p99_ratio": 2.0,
            "restarts": 1,
        },
        "failed_requests": {"total": 0, "by_phase": {}},
        "first_ranking_to_served_s": 2400.0,
        "promotion_to_served_s": 1.2,
        "up_exit": {"exit_code": 0, "seconds": 3.0, "leftovers": False},
        "oom": {"lines": []},
        "targets": {"ttft_p99_cycle<=1.5x_idle": False, "failed_requests==0": True},
        "error": None,
    }


def test_markdown_reports_figures_and_misses() -> None:
    md = markdown(_result())
    assert "| v1 (before): v1 | 0.300 | 0.500 | 50.0; 0% | 10.0% |" in md
    assert "| after the cycle: v2 | 0.450 |" in md
    assert "+15.0 ± 4.0 points" in md
    assert "p99 ratio 2.00x" in md
    assert "ttft_p99_cycle<=1.5x_idle: NO" in md and "failed_requests==0: yes" in md
    assert "Cycle cyc-1: promoted (exit 0)" in md


def test_markdown_of_a_run_that_stopped_early() -> None:
    md = markdown({"error": "TimeoutError: no record of `up`", "machine": {}, "config": {}})
    assert "stopped on an error" in md and "TimeoutError" in md


def test_the_scoring_helpers_exist() -> None:
    """The run imports these to score the held-out answers; a rename shows here first."""
    import importlib

    from benchmarks.online_learning.heldout import SCORING_HELPERS

    for module, names in SCORING_HELPERS.items():
        mod = importlib.import_module(module)
        assert [n for n in names if not callable(getattr(mod, n, None))] == [], module
