"""A stage's progress file (training/progress.py: Progress; training/metrics_log.py: MetricsLog),
which a cycle copies into its record for `instructloop status` and `cycle run --wait`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructloop.training.metrics_log import MetricsLog
from instructloop.training.progress import PROGRESS_FILE_ENV, Progress


def test_progress_is_written_first_throttled_and_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "progress.json"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    p = Progress("reward model: frozen trunk", 10)
    p.update(0)
    assert json.loads(path.read_text())["step"] == 0
    p.update(4)  # within PROGRESS_EVERY_S of the last write: skipped
    assert json.loads(path.read_text())["step"] == 0
    p.update(10)  # the last step is always written
    doc = json.loads(path.read_text())
    assert doc["stage"] == "reward model: frozen trunk" and doc["step"] == doc["total"] == 10


def test_metrics_log_reports_epoch_and_shown_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "progress.json"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    with MetricsLog(tmp_path / "m.jsonl", total=3, desc="reward model", progress=False) as m:
        for step in (1, 2, 3):
            m.log(step, {"epoch": 1, "loss": 0.25, "grad_norm": 2.0}, show=("loss",))
    doc = json.loads(path.read_text())
    assert doc == {**doc, "stage": "reward model", "step": 3, "total": 3, "epoch": 1.0}
    assert doc["loss"] == 0.25 and "grad_norm" not in doc


def test_no_progress_file_outside_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    Progress("ppo", 2).update(2)
    assert list(tmp_path.iterdir()) == []
