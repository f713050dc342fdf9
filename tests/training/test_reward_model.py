"""Reward model: each response goes through the model once, the batch loss is eq. 1 over the
explicit pairs, the trained model ranks held-out responses, the bias centres the references on
0, and plain transformers reads the same reward."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from instructloop.training.config import RewardModelConfig
from instructloop.training.datafiles import DataError, encode_prompt_response, split_rows
from instructloop.training.losses import kway_ranking_loss
from instructloop.training.reward_model import (
    BIAS_KEY,
    RewardScorer,
    group_rewards,
    load_rankings,
    reward_pad_token_id,
    run_reward_model,
    sequence_rewards,
)
from tests.support.data import write_jsonl


def seq_cls(path: Path, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32, attn_implementation=attn_implementation
    )
    with torch.no_grad():
        m.score.weight.normal_(0, 0.5)
    return m.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_each_response_is_forwarded_once_and_pairs_come_from_its_scalar(
    tiny_sft: Any, tiny_tokenizer: Any, data_dir: Path, attn: str
) -> None:
    groups = [g for _, g in load_rankings(str(data_dir / "rankings.jsonl"), tiny_tokenizer, 256, 9)]
    groups = [groups[0], groups[1]]  # K = 4 each, the first with a tie (ranks 1 2 3 3)
    groups[1] = dataclasses.replace(groups[1], prompt=groups[1].prompt[2:])  # rows differ
    assert groups[0].ranks == [1, 2, 3, 3]
    model = seq_cls(tiny_sft.path, attn)
    pad = reward_pad_token_id(tiny_tokenizer)
    seen: list[torch.Tensor] = []
    body = model.model
    handle = body.register_forward_hook(
        lambda _m, args, kw, _o: seen.append(kw["input_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        rewards = group_rewards(model, groups, pad, torch.device("cpu"))
    handle.remove()
    # One pass, one packed row per group: its prompt once, then each of its 4 responses once
    # (not two rows per pair, C(4,2) = 6 pairs, 5 without the tie; nor the prompt 4 times).
    assert len(seen) == 1 and seen[0].shape[0] == 2
    for row, g in zip(seen[0].tolist(), groups, strict=True):
        packed = g.prompt + [t for r in g.responses for t in r]
        assert row[: len(packed)] == packed and set(row[len(packed) :]) <= {pad}

    # Each reward equals the same response scored alone (padding does not leak), and the batch
    # loss equals the mean over the explicit strictly ordered pairs.
    for g, r in zip(groups, rewards, strict=True):
        for s, got in zip(g.seqs, r.tolist(), strict=True):
            ids = torch.tensor([s])
            with torch.no_grad():
                alone = sequence_rewards(model, ids, torch.ones_like(ids)).item()
            assert got == pytest.approx(alone, abs=1e-4)
        pairs = [
            (i, j) for i, j in itertools.permutations(range(len(g.ranks)), 2)
            if g.ranks[i] < g.ranks[j]
        ]  # fmt: skip
        explicit = sum(-math.log(torch.sigmoid(r[i] - r[j]).item()) for i, j in pairs) / len(pairs)
        assert kway_ranking_loss(r, g.ranks).item() == pytest.approx(explicit, abs=1e-5)


def test_reward_model_learns_and_is_centred(
    tiny_rm: Any, tiny_tokenizer: Any, data_dir: Path
) -> None:
    m = tiny_rm.manifest
    assert m["stage"] == "rm" and m["data_snapshot"] == "snap-test-1"
    assert m["metrics"]["val_accuracy"] >= 0.9  # "more apples is better" is learnable
    assert m["metrics"]["val_pairs"] > 0
    norm = m["reward_normalization"]
    scorer = RewardScorer(tiny_rm.path)
    assert scorer.bias == pytest.approx(norm["bias"]) and scorer.std == pytest.approx(norm["std"])
    # The references (best response of each training ranking) score a mean of 0 after the bias.
    rows = [json.loads(x) for x in (data_dir / "rankings.jsonl").read_text().splitlines()]
    train, _ = split_rows(rows, 0.25, 0)
    scores = scorer.score([r["prompt_text"] for r in train], [r["responses"][0] for r in train])
    assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-4)
    std = (sum(s * s for s in scores) / (len(scores) - 1)) ** 0.5
    assert std == pytest.approx(norm["std"], rel=1e-3)
    # Normalised scores (what PPO adds at the last token) are divided by that std.
    p, best = [train[0]["prompt_text"]], ["apple apple apple"]
    assert scorer.score(p, best, normalize=True)[0] == pytest.approx(
        scorer.score(p, best)[0] / norm["std"]
    )


def test_plain_transformers_reads_the_same_reward(
    tiny_rm: Any, tiny_tokenizer: Any, data_dir: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm.path, dtype=torch.float32)
    assert model.config.pad_token_id != tiny_tokenizer.eos_token_id  # pooling lands on EOS
    bias = getattr(model.config, BIAS_KEY)
    scorer = RewardScorer(tiny_rm.path)
    row = json.loads((data_dir / "rankings.jsonl").read_text().splitlines()[3])
    for resp in row["responses"]:
        ids, _ = encode_prompt_response(tiny_tokenizer, row["prompt_text"], resp, 256)
        with torch.no_grad():
            raw = model(torch.tensor([ids])).logits[0, 0].item()
        assert raw + bias == pytest.approx(scorer.score([row["prompt_text"]], [resp])[0], abs=1e-4)


def test_scorer_batches_by_length_and_keeps_the_order(tiny_rm: Any, data_dir: Path) -> None:
    """Sequences of mixed lengths, scored in length-sorted batches, come back in their own
    order with the score each gets alone; bf16 autocast scores stay close to float32."""
    rows = [json.loads(x) for x in (data_dir / "rankings.jsonl").read_text().splitlines()]
    # Lengths out of order: 7, 1, 5, 2, 8, 3, 6, 4 words.
    counts = [7, 1, 5, 2, 8, 3, 6, 4]
    prompts = [rows[i]["prompt_text"] for i in range(len(counts))]
    resps = [" ".join(["apple", "pear"] * n)[: 11 * n] for n in counts]
    one = RewardScorer(tiny_rm.path)
    alone = [one.score([p], [r])[0] for p, r in zip(prompts, resps, strict=True)]
    batched = RewardScorer(tiny_rm.path, batch_size=3).score(prompts, resps)
    assert batched == pytest.approx(alone, abs=1e-5)
    bf16 = RewardScorer(tiny_rm.path, batch_size=3, mixed_precision="bf16").score(prompts, resps)
    assert bf16 == pytest.approx(alone, rel=0.05, abs=0.05)
    assert bf16 != pytest.approx(alone, abs=1e-7)  # it did run under autocast


def test_rankings_that_teach_nothing_or_are_malformed_are_refused(
    tiny_sft: Any, tmp_path: Path
) -> None:
    common = dict(model_path=str(tiny_sft.path), output_dir=str(tmp_path / "rm"), progress=False)
    ties = write_jsonl(tmp_path / "ties.jsonl", [
        {"prompt_text": f"p{i}", "responses": ["a", "b"], "ranks": [1, 1]} for i in range(4)
    ])  # fmt: skip
    with pytest.raises(DataError, match="no ranking with at least one strict preference"):
        run_reward_model(RewardModelConfig(train_path=str(ties), **common))  # type: ignore[arg-type]
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt_text": "p", "responses": ["a", "b"], "ranks": [1, 2]},
        {"prompt_text": "p", "responses": ["a", "b"], "ranks": [1]},
    ])  # fmt: skip
    with pytest.raises(DataError, match=r"bad.jsonl:2: ranks"):
        run_reward_model(RewardModelConfig(train_path=str(bad), **common))  # type: ignore[arg-type]
    assert not (tmp_path / "rm").exists()
