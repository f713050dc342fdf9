"""The serving benchmark's paired comparison (benchmarks/serving.py): each rep's instructloop
run is compared with the vLLM run of the same rep, and the mean ratio gets a Student t 95%
interval. Checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from benchmarks.serving import LevelResult, markdown, mean_ci95, paired_ratios


def _run(server: str, c: int, rep: int | None, tok_s: float, ttft: float) -> LevelResult:
    return LevelResult(server, c, 8, 0, 0, 0.0, tok_s, ttft, 0.0, 0.0, 0.0, rep=rep)


def test_mean_ci95_by_hand() -> None:
    # mean 1.0; sample stdev 0.1; t(2 df) = 4.30: half-width 4.30 * 0.1 / sqrt(3) = 0.24826
    m, h = mean_ci95([1.0, 1.1, 0.9])
    assert m == pytest.approx(1.0)
    assert h == pytest.approx(4.30 * 0.1 / math.sqrt(3))
    assert mean_ci95([1.2]) == (pytest.approx(1.2), 0.0)


def test_ratios_pair_runs_of_the_same_rep() -> None:
    reps = [
        _run("vllm-openai", 8, 0, 100.0, 0.40),
        _run("instructloop", 8, 0, 110.0, 0.44),
        _run("instructloop", 8, 1, 90.0, 0.30),
        _run("vllm-openai", 8, 1, 100.0, 0.50),
        _run("vllm-openai", 32, 0, 300.0, 1.0),  # another level, and a rep with no partner
        _run("instructloop", 8, 2, 95.0, 0.40),
    ]
    assert paired_ratios(reps, "instructloop", 8) == [
        (pytest.approx(1.1), pytest.approx(1.1)),
        (pytest.approx(0.9), pytest.approx(0.6)),
    ]
    assert paired_ratios(reps, "instructloop", 32) == []
    pooled = [_run("vllm-openai", 8, None, 100.0, 0.45), _run("instructloop", 8, None, 100.0, 0.37)]
    table = markdown(pooled, {"date": "d", "cpu": "c", "cores": 2, "model": "m"}, reps)
    # mean 1.0 +- 12.71 * stdev(1.1, 0.9) / sqrt(2) = 12.71 * 0.14142 / 1.41421 = 1.271
    assert "| instructloop | vllm-openai | 8 | 1.10 0.90 | 1.000x [-0.271, 2.271] |" in table
    assert "- instructloop c=8 against vllm-openai: throughput ratio 1.00x" in table


def test_ratios_against_the_matched_vllm_server() -> None:
    """With vLLM's server also run in instructloop's engine environment, each instructloop run
    is paired with each baseline of its rep, and the table has a row per baseline."""
    reps = [
        _run("vllm-openai", 8, 0, 100.0, 0.50),
        _run("vllm-openai-matched", 8, 0, 125.0, 0.40),
        _run("instructloop", 8, 0, 130.0, 0.42),
        _run("vllm-openai", 8, 1, 80.0, 0.50),
        _run("vllm-openai-matched", 8, 1, 104.0, 0.44),
        _run("instructloop", 8, 1, 100.0, 0.44),
    ]
    assert paired_ratios(reps, "instructloop", 8) == [
        (pytest.approx(1.3), pytest.approx(0.84)),
        (pytest.approx(1.25), pytest.approx(0.88)),
    ]
    assert paired_ratios(reps, "instructloop", 8, "vllm-openai-matched") == [
        (pytest.approx(1.04), pytest.approx(1.05)),
        (pytest.approx(100 / 104), pytest.approx(1.0)),
    ]
    pooled = [
        _run("vllm-openai", 8, None, 90.0, 0.5),
        _run("vllm-openai-matched", 8, None, 114.5, 0.42),
        _run("instructloop", 8, None, 115.0, 0.43),
    ]
    meta = {"date": "d", "cpu": "c", "cores": 2, "model": "m", "matched_env": "X=0"}
    table = markdown(pooled, meta, reps)
    assert "environment instructloop's server sets on this machine, X=0" in table
    assert "- instructloop c=8 against vllm-openai-matched: throughput ratio 1.00x" in table
    assert "- instructloop c=8 against vllm-openai: throughput ratio 1.28x" in table
    # (1.04 + 0.96154) / 2 = 1.00077
    assert "| instructloop | vllm-openai-matched | 8 | 1.04 0.96 | 1.001x [" in table
    assert "| instructloop | vllm-openai | 8 | 1.30 1.25 | 1.275x [" in table
