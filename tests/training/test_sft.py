"""SFT: the loss covers the response only (checked against transformers' own label masking),
the chat template is applied, residual dropout acts in training only, the run learns and
selects its checkpoint by validation loss or by reward-model score."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from instructloop.training.config import ConfigError, SFTConfig
from instructloop.training.datafiles import DataError, load_demonstrations, prompt_text_of
from instructloop.training.losses import lm_loss
from instructloop.training.models import add_residual_dropout, pad_batch
from instructloop.training.sft import response_loss_mask, run_sft, validation_loss
from tests.support.data import chat_prompt, write_jsonl


def test_loss_mask_covers_completion_and_eos_only(
    tiny_model_dir: Path, tiny_tokenizer: Any, data_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    demos = [d for _, d in load_demonstrations(str(data_dir / "sft.jsonl"), tiny_tokenizer, 256)]
    d = demos[0]
    prompt_ids = tiny_tokenizer(d.prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tiny_tokenizer("apple apple", add_special_tokens=False)["input_ids"]
    assert d.ids == [*prompt_ids, *completion_ids, tiny_tokenizer.eos_token_id]
    assert d.prompt_len == len(prompt_ids)

    # Against transformers' loss with prompt labels set to -100 (an independent implementation),
    # on a right-padded batch of two different lengths.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = [demos[0], demos[5]]
    ids, attn = pad_batch([x.ids for x in batch], tiny_tokenizer.pad_token_id, torch.device("cpu"))
    mask = response_loss_mask(batch, attn)
    assert mask.sum().item() == sum(len(x.ids) - x.prompt_len for x in batch)
    labels = ids.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, labels=labels)
        ours = lm_loss(out.logits, ids, mask)
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_messages_get_the_chat_template(tiny_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Repeat apple"}]
    assert prompt_text_of({"prompt": messages}, tiny_tokenizer) == chat_prompt(
        tiny_tokenizer, "Repeat apple"
    )
    assert prompt_text_of({"messages": messages}, tiny_tokenizer) == chat_prompt(
        tiny_tokenizer, "Repeat apple"
    )
    assert prompt_text_of({"prompt_text": "exact", "prompt": messages}, tiny_tokenizer) == "exact"
    assert prompt_text_of({"prompt": "raw text"}, tiny_tokenizer) == "raw text"
    with pytest.raises(DataError):
        prompt_text_of({"completion": "x"}, tiny_tokenizer)


def test_residual_dropout_only_while_training(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base = model(ids).logits
    handles = add_residual_dropout(model, 0.2)
    assert len(handles) == 2 * model.config.num_hidden_layers  # attention and MLP per layer
    model.train()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    for h in handles:
        h.remove()
    assert add_residual_dropout(model, 0.0) == []


def test_sft_learns_and_selects_by_validation_loss(
    tiny_sft: Any, tiny_model_dir: Path, tiny_tokenizer: Any, data_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    m = tiny_sft.manifest
    assert m["stage"] == "sft" and m["parent_version"] == "v1"
    assert m["data_snapshot"] == "snap-test-1"
    assert m["config"]["epochs"] == 6 and m["config"]["adam_betas"] == [0.9, 0.95]
    rows = [json.loads(x) for x in (tiny_sft.path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert len(evals) == 6  # once per epoch
    best = min(evals, key=lambda r: r["val_loss"])
    assert m["metrics"]["selected_step"] == best["step"]
    assert m["metrics"]["val_loss"] == pytest.approx(best["val_loss"])
    # Cosine decay to 10% of the peak, no warm-up.
    assert rows[-1]["lr"] == pytest.approx(0.1 * m["config"]["lr"])
    assert rows[0]["lr"] > 0.95 * m["config"]["lr"]
    # The saved weights are the selected ones: recompute the validation loss from disk.
    cfg = SFTConfig(batch_size=8)
    demos = [d for _, d in load_demonstrations(str(data_dir / "sft.jsonl"), tiny_tokenizer, 1024)]
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(tiny_sft.path, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    assert validation_loss(saved, demos, tiny_tokenizer, cpu, cfg) < 0.5 * validation_loss(
        start, demos, tiny_tokenizer, cpu, cfg
    )


def test_sft_selects_by_reward_model_score(
    tiny_model_dir: Path, tiny_rm: Any, data_dir: Path, tmp_path: Path
) -> None:
    cfg = SFTConfig(
        model_path=str(tiny_model_dir),
        train_path=str(data_dir / "sft.jsonl"),
        output_dir=str(tmp_path / "sft"),
        epochs=1,
        batch_size=8,
        eval_every=2,
        lr=1e-2,
        residual_dropout=0.2,
        reward_model_path=str(tiny_rm.path),
        select_max_prompts=4,
        select_max_new_tokens=4,
        progress=False,
    )
    info = run_sft(cfg)
    rows = [json.loads(x) for x in (info.path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "rm_score" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps and the last
    best = max(evals, key=lambda r: r["rm_score"])
    assert info.metrics["selected_by"] == "rm_score"
    assert info.metrics["selected_step"] == best["step"]


def test_bad_input_changes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt_text": "p", "completion": "c"}, {"x": 1}])
    out = tmp_path / "out"
    cfg = SFTConfig(model_path=str(tiny_model_dir), train_path=str(bad), output_dir=str(out))
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing completion"):
        run_sft(cfg)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ConfigError, match="exists"):
        run_sft(cfg)
    with pytest.raises(ConfigError, match="residual_dropout"):
        run_sft(SFTConfig(train_path=str(bad), output_dir=str(out), residual_dropout=1.5))
    assert list(out.iterdir()) == []
