"""Evaluation: win rates, LM loss (the alignment tax), the judges and `instructloop eval`.

Numbers are checked against hand computation: a tiny random Llama built from the default model's
tokenizer (tests/training/conftest.py; nothing downloaded), and a copy of it whose embeddings are
zero, which predicts the uniform distribution, so its loss is exactly ln(vocab size).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from instructloop.training.data.constraints import make_prompt
from instructloop.training.evaluate import (
    EvalConfig,
    format_table,
    lm_loss,
    model_lm_loss,
    read_texts,
)
from instructloop.training.judges import ConstraintJudge, judge_win_rate, win_rate

TEXTS = [
    "The moon is bright tonight.",
    "Bees make honey in the summer and rest in the winter when the flowers are gone.",
    "Tea.",
]

# --- win rate ------------------------------------------------------------------------------------


def test_win_rate_by_hand() -> None:
    w = win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0])
    # wins: prompts 0 and 3; tie: prompt 1; loss: prompt 2 -> (2 + 0.5) / 4
    assert (w.wins, w.ties, w.losses, w.n) == (2, 1, 1, 4)
    assert w.win_rate == pytest.approx(0.625)
    assert w.stderr == pytest.approx(math.sqrt(0.625 * 0.375 / 4))
    # A tolerance turns near-equal scores into ties.
    w = win_rate([1.0, 2.05], [1.01, 2.0], tie_eps=0.1)
    assert (w.ties, w.win_rate) == (2, 0.5)
    assert win_rate([0.0], [1.0]).win_rate == 0.0


def test_win_rate_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="scores"):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no prompts"):
        win_rate([], [])
    with pytest.raises(ValueError, match="non-finite"):
        win_rate([float("nan")], [0.0])


def test_constraint_judge_win_rate_by_hand() -> None:
    two = make_prompt(
        "Describe {s}.", "snow", ["punctuation:no_comma", "detectable_format:title"], [{}, {}]
    )
    one = make_prompt("Describe {s}.", "tea", ["keywords:existence"], [{"keywords": ["green"]}])
    prompts = [two, two, one]
    a = ["<<snow>>\nWhite and cold.", "Cold, white.", "Green tea."]  # 2/2, 0/2, 1/1
    b = ["Snow is white.", "Cold, white.", "Black tea."]  # 1/2, 0/2, 0/1
    assert ConstraintJudge().scores(prompts, a) == [1.0, 0.0, 1.0]
    assert ConstraintJudge().scores(prompts, b) == [0.5, 0.0, 0.0]
    w = judge_win_rate(ConstraintJudge(), prompts, a, b)
    assert (w.wins, w.ties, w.losses) == (2, 1, 0)
    assert w.win_rate == pytest.approx(2.5 / 3)


# --- LM loss -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tok


def _reference_nll(model, tok, text: str) -> tuple[float, int]:
    """Σ −log p(x_t | x_<t) of one text, one unpadded forward, summed position by position."""
    import torch

    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for t in range(1, len(ids)):
        total -= float(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]])
    return total, len(ids) - 1


def test_lm_loss_is_token_weighted_nll(tiny) -> None:
    model, tok = tiny
    ref = [_reference_nll(model, tok, t) for t in TEXTS]
    expected = sum(s for s, _ in ref) / sum(n for _, n in ref)
    for batch_size in (1, 2, 8):  # padding must not change it
        got = lm_loss(model, tok, TEXTS, batch_size=batch_size)
        assert got.nll == pytest.approx(expected, rel=1e-5)
        assert got.n_tokens == sum(n for _, n in ref) and got.n_texts == 3
    # Token weighting, not a mean of per-text means (the texts differ in length).
    per_text_mean = sum(s / n for s, n in ref) / len(ref)
    assert abs(per_text_mean - expected) > 1e-3
    # Cutting texts to max_length tokens predicts max_length - 1 tokens per long text.
    cut = lm_loss(model, tok, TEXTS, max_length=4)
    assert cut.n_tokens == sum(min(n + 1, 4) - 1 for _, n in ref)


def test_lm_loss_of_uniform_model_is_ln_vocab(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()  # tied head: every logit is 0
    model.save_pretrained(tmp_path / "uniform")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "uniform")
    got = model_lm_loss(tmp_path / "uniform", TEXTS, device="cpu")
    assert model.config.vocab_size == 49152
    assert got.nll == pytest.approx(math.log(49152), rel=1e-6)
    assert got.perplexity == pytest.approx(49152, rel=1e-5)


def test_read_texts(tmp_path: Path) -> None:
    p = tmp_path / "ptx.jsonl"
    p.write_text('{"text": "a b"}\n\n{"text": "  "}\n{"text": "c"}\n')
    assert read_texts(p) == ["a b", "c"]
    p.write_text('{"txt": "a"}\n')
    with pytest.raises(ValueError, match=r"ptx\.jsonl:1"):
        read_texts(p)


def test_shipped_ptx_corpus_is_readable() -> None:
    from instructloop.training.evaluate import DEFAULT_PTX_HELDOUT

    texts = read_texts(DEFAULT_PTX_HELDOUT)
    assert len(texts) >= 40
    assert all("<|im_start|>assistant" in t for t in texts)


# --- reward-model judge --------------------------------------------------------------------------


def test_reward_model_judge_matches_transformers(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from instructloop.training.judges import RewardModelJudge

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels = 1
    cfg.pad_token_id = 0  # not EOS: the score is read at the EOS closing the response
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_config(cfg).to(torch.float32)
    rm.save_pretrained(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(tmp_path / "rm")

    p = make_prompt("Describe {s}.", "snow", ["punctuation:no_comma"], [{}])
    answers = ["Snow is white.", "Cold, white snow."]
    judge = RewardModelJudge(tmp_path / "rm", device="cpu")
    got = judge.scores([p, p], answers)
    text = tok.apply_chat_template(
        [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True
    )
    for a, g in zip(answers, got, strict=True):
        ids = tok(text + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            ref = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert g == pytest.approx(ref, abs=1e-4)
    assert got[0] != got[1]
    same = judge_win_rate(judge, [p, p], answers, answers)
    assert (same.ties, same.win_rate) == (2, 0.5)


# --- config and table ----------------------------------------------------------------------------


def test_eval_config_refuses_bad_input(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a model directory"):
        EvalConfig(policy=str(tmp_path))
    with pytest.raises(ValueError, match="n_prompts"):
        EvalConfig(policy=str(tiny_model_dir), n_prompts=0)
    with pytest.raises(ValueError, match="ptx_path"):
        EvalConfig(policy=str(tiny_model_dir), ptx_path=str(tmp_path / "none.jsonl"))


def test_format_table() -> None:
    m = {
        "ifeval": {"prompt_level": 0.25, "instruction_level": 0.5},
        "ptx_lm_loss": {"nll": 2.0},
        "mean_response_words": 10.0,
        "mean_reward": None,
    }
    report = {
        "models": {"policy": m, "baseline": {**m, "ptx_lm_loss": {"nll": 1.9}}},
        "win_rate": {
            "constraints": {"win_rate": 0.6, "stderr": 0.05, "wins": 5, "ties": 2, "losses": 3}
        },
        "ptx_lm_loss_rise": 0.1 / 1.9,
        "prompt_level_gain": {
            "points": 12.5, "standard_error_points": 4.31, "gained": 3, "lost": 1, "n_prompts": 16
        },
    }  # fmt: skip
    table = format_table(report)
    assert "prompt-level accuracy" in table and "0.250" in table
    assert "win rate (constraints)" in table and "0.600" in table and "5/2/3" in table
    assert "+5.26%" in table
    assert "+12.5  ± 4.3 points (prompts gained/lost 3/1)" in table


# --- the verb, end to end (vLLM) -----------------------------------------------------------------


@pytest.mark.slow
def test_eval_cli_same_model_both_sides(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The policy against itself: greedy answers agree, so every prompt ties (win rate 0.5),
    both columns are equal, and the LM loss matches `model_lm_loss` on the same corpus."""
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "instructloop.cli",
        "eval",
        "--policy",
        str(tiny_model_dir),
        "--baseline",
        str(tiny_model_dir),
        "--n-prompts",
        "6",
        "--max-tokens",
        "8",
        "--ptx",
        str(ptx),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "win rate (constraints)" in proc.stdout
    r = json.loads(out.read_text())
    pol, base = r["models"]["policy"], r["models"]["baseline"]
    assert pol["ifeval"] == base["ifeval"] and pol["ifeval"]["n_prompts"] == 6
    assert r["win_rate"]["constraints"]["ties"] == 6
    assert r["win_rate"]["constraints"]["win_rate"] == 0.5
    assert r["ptx_lm_loss_rise"] == 0.0
    gain = r["prompt_level_gain"]
    assert (gain["points"], gain["gained"], gain["lost"], gain["n_prompts"]) == (0.0, 0, 0, 6)
    assert len(pol["ifeval"]["per_prompt"]) == 6
    expected = model_lm_loss(tiny_model_dir, TEXTS, device="cpu")
    assert pol["ptx_lm_loss"]["nll"] == pytest.approx(expected.nll, rel=1e-6)


def test_eval_cli_refuses_a_bad_policy(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "instructloop.cli", "eval", "--policy", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "not a model directory" in proc.stderr
