"""The learning benchmark's harness (benchmarks/learning/) end to end at --quick sizes on the
default model: sampling, the simulated labeller's export, RM, PPO-ptx on vLLM, the evaluation of
the final and the intermediate checkpoints; then a rerun in the same work dir that reuses what
has the same settings and trains again what does not. The learning itself is measured by the
hour-long benchmark, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]


def _run(work: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.learning",
        "--quick",
        "--work-dir",
        str(work),
        "--out",
        str(out),
        "plain_ppo=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_learning_harness_quick_run_and_resume(model_dir: Path, tmp_path: Path) -> None:
    # The default model, not the tiny random one: the tiny model's K samples met the same
    # constraints in 15 of 16 groups, so the 8 validation groups could all tie and leave the
    # RM nothing to validate on.
    work, out = tmp_path / "work", tmp_path / "result.json"
    _run(
        work,
        out,
        f"model={model_dir}",
        "eval_steps=true",
        'ppo={"save_every": 1}',
    )
    r = json.loads(out.read_text())
    acc = r["heldout_accuracy"]
    assert acc["before"]["n_prompts"] == 8 and acc["ppo_ptx"]["n_prompts"] == 8
    gain = r["paired_gain"]["ppo_ptx"]
    assert gain["points"] == r["prompt_level_gain_points"]
    assert set(r["targets"]) == {
        "prompt_level_gain_points>=10",
        "ppo_ptx_lm_loss_rise<=2%",
        "recipe_minutes<=60",
    }
    assert r["reward_model"]["val_pairs"] > 0
    # --quick: 16 episodes in steps of 8, a checkpoint after step 1; the curve ends with the
    # final policy, scored as the table scores it.
    curve = r["checkpoint_curve"]["ppo_ptx"]
    assert [c["step"] for c in curve] == [1, 2]
    assert curve[-1]["prompt_level"] == acc["ppo_ptx"]["prompt_level"]
    assert all(0.0 <= c["prompt_level"] <= 1.0 for c in curve)
    assert curve[-1]["ptx_lm_loss"] == r["ptx_lm_loss"]["ppo_ptx"]["nll"]
    assert all(c["ptx_lm_loss"] > 0 for c in curve)
    md = out.with_suffix(".md").read_text()
    assert "Along the ppo_ptx run" in md and "Targets met" in md

    # Same sampling and RM settings, another PPO learning rate: samples and RM are reused
    # (their recorded times too), PPO-ptx trains again, and the old step checkpoint (another
    # config) is not scored as this run's.
    proc = _run(
        work,
        out,
        f"model={model_dir}",
        "eval_steps=true",
        # save_every 2 of 2 steps writes no step checkpoint: only the stale step 1 is there.
        'ppo={"lr": 1e-5, "save_every": 2}',
    )
    assert "resuming: samples" in proc.stderr and "resuming: rm" in proc.stderr
    assert "ppo_ptx: the previous run used other settings" in proc.stderr
    assert "ppo_ptx: PPO with gamma_ptx" in proc.stderr
    r2 = json.loads(out.read_text())
    assert r2["seconds"]["sample_s"] == r["seconds"]["sample_s"]
    assert r2["seconds"]["rm_s"] == r["seconds"]["rm_s"]
    assert r2["checkpoint_curve"] == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval_steps=yes", "eval_steps takes a JSON bool"),
        ("n_train_prompts=1e3", "n_train_prompts takes a JSON int"),
        ("ppo=32", "ppo takes a JSON dict"),
        ("no_such_field=1", "unknown LearningConfig field"),
        # No ppo save_every: no step checkpoint to score.
        ("eval_steps=true", 'eval_steps=true scores the checkpoints of ppo={"save_every": N}'),
    ],
)
def test_learning_harness_refuses_a_bad_override(
    override: str, message: str, tmp_path: Path
) -> None:
    """Refused before anything runs: no work dir, no result file."""
    work, out = tmp_path / "work", tmp_path / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.learning", "--work-dir", str(work)]
    proc = subprocess.run(
        [*cmd, "--out", str(out), override], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not work.exists() and not out.exists()
