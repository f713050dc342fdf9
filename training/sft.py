"""Stage 1 of InstructGPT: supervised fine-tuning on demonstrations (§3.5, App. C.1).

The whole stage is `run_sft(cfg)`: read prompt -> completion pairs, train a causal LM with the
loss on the completion tokens only, cosine-decay the learning rate to 10% of its peak, drop out
the residual branches, evaluate as it goes, keep the best evaluation and write it as a checkpoint.

"Best" follows the paper: with a reward model, the mean RM score of the policy's greedy answers
to validation prompts (the paper found validation loss overfits after one epoch while RM score
and human preference keep rising); without one, the validation loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from instructloop.training.checkpoint import CheckpointInfo
from instructloop.training.config import SFTConfig
from instructloop.training.datafiles import (
    Demonstration,
    load_demonstrations,
    train_and_validation,
)
from instructloop.training.losses import lm_loss
from instructloop.training.models import add_residual_dropout, pad_batch, train_model_kwargs
from instructloop.training.optim import adamw, cosine_schedule, guarded_step
from instructloop.training.reward_model.scorer import RewardScorer
from instructloop.training.runtime import autocast
from instructloop.training.stage import Stage, start_stage


def run_sft(cfg: SFTConfig) -> CheckpointInfo:
    """Fine-tune `cfg.model_path` on `cfg.train_path`; write the selected checkpoint to
    `cfg.output_dir` and return it."""
    stage = start_stage(cfg, data_field="train_path", model_field="model_path")
    tok, device = stage.tokenizer, stage.device

    # -- data: demonstrations, tokenised once
    train, val = train_and_validation(
        load_demonstrations(cfg.train_path, tok, cfg.max_length),
        load_demonstrations(cfg.val_path, tok, cfg.max_length) if cfg.val_path else None,
        cfg.val_fraction,
        cfg.seed,
    )

    model = load_policy(stage, cfg)
    opt = adamw(
        list(model.parameters()), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    total_steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    # Cosine decay to 10% of the peak, no warm-up (paper).
    sched = cosine_schedule(opt, total_steps, cfg.lr_final_fraction, cfg.warmup_steps)
    scorer = None
    if cfg.reward_model_path:
        scorer = RewardScorer(cfg.reward_model_path, device=device, max_length=cfg.max_length)
    selection = Selection("rm_score" if scorer is not None else "val_loss")

    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    model.train()
    with stage.metrics_log(total=total_steps, desc="sft") as mlog:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(train), generator=gen).tolist()
            for start in range(0, len(order), cfg.batch_size):
                batch = [train[i] for i in order[start : start + cfg.batch_size]]
                loss = accumulate_gradients(model, batch, tok.pad_token_id, device, cfg)
                grad_norm = guarded_step(opt, model.parameters(), cfg.max_grad_norm, loss)
                sched.step()
                step += 1
                row: dict[str, Any] = {
                    "epoch": epoch,
                    "loss": loss,
                    "grad_norm": float(grad_norm),
                    "lr": sched.get_last_lr()[0],
                }
                end_of_epoch = start + cfg.batch_size >= len(order)
                if evaluation_due(cfg, step, end_of_epoch) or step == total_steps:
                    row.update(evaluate(model, val, tok, device, cfg, scorer))
                    selection.consider(model, row, step)
                mlog.log(step, row, show=("loss", "val_loss", "rm_score"))
                mlog.advance()

    selected = selection.restore(model)
    sizes = {"steps": total_steps, "train_examples": len(train), "val_examples": len(val)}
    return stage.write_checkpoint(model, name="sft", metrics={**selected, **sizes})


def evaluation_due(cfg: SFTConfig, step: int, end_of_epoch: bool) -> bool:
    """Every `eval_every` steps, or at each epoch's end when it is 0 (the last step always
    evaluates too, so there is something to select)."""
    if cfg.eval_every:
        return step % cfg.eval_every == 0
    return end_of_epoch


def load_policy(stage: Stage, cfg: SFTConfig) -> Any:
    """The model to fine-tune: float32 master weights, no KV cache, and residual dropout (paper:
    0.2) while it trains."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        stage.model_path, **train_model_kwargs(cfg, stage.device)
    ).to(stage.device)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    add_residual_dropout(model, cfg.residual_dropout)
    return model


def accumulate_gradients(
    model: Any, batch: list[Demonstration], pad_id: int, device: torch.device, cfg: SFTConfig
) -> float:
    """Backward passes over `batch` in `cfg.grad_accum` micro-batches; returns the batch loss.
    Token-weighted: each micro-batch's mean loss is scaled by its share of the batch's target
    tokens, so the accumulated gradient equals one big batch's mean."""
    micro = cfg.batch_size // cfg.grad_accum
    n_tok = sum(len(d.ids) - d.prompt_len for d in batch)
    loss_sum = 0.0
    for m0 in range(0, len(batch), micro):
        mb = batch[m0 : m0 + micro]
        ids, attn = pad_batch([d.ids for d in mb], pad_id, device)
        loss_mask = response_loss_mask(mb, attn).to(device)
        with autocast(device, cfg.mixed_precision):
            logits = model(input_ids=ids, attention_mask=attn).logits
        loss = lm_loss(logits, ids, loss_mask)
        share = sum(len(d.ids) - d.prompt_len for d in mb) / n_tok
        (loss * share).backward()
        loss_sum += loss.item() * share
    return loss_sum


def response_loss_mask(batch: list[Demonstration], attn: torch.Tensor) -> torch.Tensor:
    """1 on completion tokens (EOS included), 0 on the prompt and on padding."""
    mask = torch.zeros_like(attn, dtype=torch.float32)
    for i, ex in enumerate(batch):
        mask[i, ex.prompt_len : len(ex.ids)] = 1.0
    return mask


@dataclass
class Selection:
    """The evaluation to keep (§3.5): the highest RM score, or the lowest validation loss, with a
    copy of the weights that gave it."""

    by: str  # "rm_score" or "val_loss"
    metrics: dict[str, float] | None = None
    state: dict[str, torch.Tensor] | None = None
    step: int = 0

    def consider(self, model: Any, row: dict[str, Any], step: int) -> None:
        m = {k: row[k] for k in ("val_loss", "rm_score") if k in row}
        if self.metrics is not None:
            if self.by == "rm_score" and not m["rm_score"] > self.metrics["rm_score"]:
                return
            if self.by == "val_loss" and not m["val_loss"] < self.metrics["val_loss"]:
                return
        self.metrics, self.step = m, step
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def restore(self, model: Any) -> dict[str, Any]:
        """Load the kept weights into `model`; returns the kept evaluation and its step."""
        assert self.state is not None and self.metrics is not None  # the last step evaluates
        model.load_state_dict(self.state)
        return {**self.metrics, "selected_step": self.step, "selected_by": self.by}


def evaluate(
    model: Any,
    val: list[Demonstration],
    tok: Any,
    device: torch.device,
    cfg: SFTConfig,
    scorer: RewardScorer | None,
) -> dict[str, float]:
    """Validation loss, and with a reward model the mean score of greedy answers to the first
    `select_max_prompts` validation prompts. Eval mode (no dropout) while it runs."""
    model.eval()
    metrics = {"val_loss": validation_loss(model, val, tok, device, cfg)}
    if scorer is not None:
        prompts = [d.prompt_text for d in val[: cfg.select_max_prompts]]
        responses = greedy_responses(model, tok, prompts, cfg.select_max_new_tokens, device)
        scores = scorer.score(prompts, responses)
        metrics["rm_score"] = sum(scores) / len(scores)
    model.train()
    return metrics


def validation_loss(
    model: Any, val: list[Demonstration], tok: Any, device: torch.device, cfg: SFTConfig
) -> float:
    """Token-weighted mean NLL of the validation completions (eval mode, no dropout)."""
    total, count = 0.0, 0
    micro = max(1, cfg.batch_size // cfg.grad_accum)
    with torch.no_grad():
        for i in range(0, len(val), micro):
            mb = val[i : i + micro]
            ids, attn = pad_batch([d.ids for d in mb], tok.pad_token_id, device)
            mask = response_loss_mask(mb, attn).to(device)
            with autocast(device, cfg.mixed_precision):
                logits = model(input_ids=ids, attention_mask=attn).logits
            n = int(mask[:, 1:].sum().item())
            total += lm_loss(logits, ids, mask).item() * n
            count += n
    return total / max(count, 1)


def greedy_responses(
    model: Any,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers with transformers' generate (a few validation prompts for selection; PPO's
    rollouts use vLLM). Left padding, as decoder-only generation needs."""
    out: list[str] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(
                prompts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            for row in gen[:, enc["input_ids"].shape[1] :]:
                out.append(tok.decode(row, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return out


__all__ = ["greedy_responses", "response_loss_mask", "run_sft", "validation_loss"]
