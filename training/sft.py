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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructloop.training.checkpoint import CheckpointInfo, write_checkpoint
from instructloop.training.common import (
    DataError,
    MetricsLog,
    adamw,
    add_residual_dropout,
    autocast,
    data_snapshot_of,
    default_log_path,
    encode_prompt_response,
    load_tokenizer,
    model_dtype_name,
    pad_batch,
    prepare_runtime,
    prompt_text_of,
    read_jsonl,
    resolve_device,
    resolve_model_path,
    set_seed,
    split_rows,
    train_model_kwargs,
)
from instructloop.training.config import ConfigError, SFTConfig, config_to_dict, validate
from instructloop.training.losses import cosine_lr_factor, lm_loss

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Demonstration:
    """One tokenised example: prompt + completion + EOS, and where the completion starts."""

    ids: list[int]
    prompt_len: int
    prompt_text: str


def load_demonstrations(
    path: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[tuple[dict[str, Any], Demonstration]]:
    """sft.jsonl rows with their tokenisation (prompt via `prompt_text_of`: chat template for
    messages). EOS ends each completion so the model learns to stop."""
    out = []
    for n, row in enumerate(read_jsonl(path, required=("completion",)), 1):
        if not isinstance(row["completion"], str) or not row["completion"]:
            raise DataError(f"{path}:{n}: completion must be a non-empty string")
        prompt = prompt_text_of(row, tokenizer, f"{path}:{n}")
        ids, plen = encode_prompt_response(tokenizer, prompt, row["completion"], max_length)
        out.append((row, Demonstration(ids, plen, prompt)))
    return out


def response_loss_mask(batch: list[Demonstration], attn: torch.Tensor) -> torch.Tensor:
    """1 on completion tokens (EOS included), 0 on the prompt and on padding."""
    import torch

    mask = torch.zeros_like(attn, dtype=torch.float32)
    for i, ex in enumerate(batch):
        mask[i, ex.prompt_len : len(ex.ids)] = 1.0
    return mask


def run_sft(cfg: SFTConfig) -> CheckpointInfo:
    """Fine-tune `cfg.model_path` on `cfg.train_path`; write the selected checkpoint to
    `cfg.output_dir` and return it."""
    import torch
    from transformers import AutoModelForCausalLM

    validate(cfg)
    if not cfg.output_dir or not cfg.train_path:
        raise ConfigError("output_dir and train_path are required")
    if Path(cfg.output_dir).exists() and not cfg.overwrite:
        raise ConfigError(f"{cfg.output_dir} exists (set overwrite=true to replace it)")
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    prepare_runtime(cfg, device)
    model_path = resolve_model_path(cfg.model_path)
    tok = load_tokenizer(model_path)

    # -- data: demonstrations, tokenised once
    rows = load_demonstrations(cfg.train_path, tok, cfg.max_length)
    if cfg.val_path:
        train = [d for _, d in rows]
        val = [d for _, d in load_demonstrations(cfg.val_path, tok, cfg.max_length)]
    else:
        tr, va = split_rows([r for r, _ in rows], cfg.val_fraction, cfg.seed)
        by_id = {id(r): d for r, d in rows}
        train, val = [by_id[id(r)] for r in tr], [by_id[id(r)] for r in va]

    # -- model: float32 master weights; residual dropout 0.2 (paper) while training
    model = AutoModelForCausalLM.from_pretrained(model_path, **train_model_kwargs(cfg, device)).to(
        device
    )
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    add_residual_dropout(model, cfg.residual_dropout)
    opt = adamw(
        list(model.parameters()), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    # Cosine decay to 10% of the peak, no warm-up (paper).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr_factor(s, total_steps, cfg.lr_final_fraction, cfg.warmup_steps)
    )
    scorer = None
    if cfg.reward_model_path:
        from instructloop.training.reward_model import RewardScorer

        scorer = RewardScorer(cfg.reward_model_path, device=device, max_length=cfg.max_length)
    select_by = "rm_score" if scorer is not None else "val_loss"

    def evaluate() -> dict[str, float]:
        model.eval()
        metrics = {"val_loss": validation_loss(model, val, tok, device, cfg)}
        if scorer is not None:
            prompts = [d.prompt_text for d in val[: cfg.select_max_prompts]]
            responses = greedy_responses(model, tok, prompts, cfg.select_max_new_tokens, device)
            scores = scorer.score(prompts, responses)
            metrics["rm_score"] = sum(scores) / len(scores)
        model.train()
        return metrics

    def better(m: dict[str, float], best: dict[str, float] | None) -> bool:
        if best is None:
            return True
        if select_by == "rm_score":
            return m["rm_score"] > best["rm_score"]
        return m["val_loss"] < best["val_loss"]

    best_metrics: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_step = 0
    log_path = default_log_path(cfg.output_dir, cfg.log_path)
    gen = torch.Generator().manual_seed(cfg.seed)
    micro = cfg.batch_size // cfg.grad_accum
    step = 0
    model.train()
    with MetricsLog(log_path, total=total_steps, desc="sft", progress=cfg.progress) as mlog:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(train), generator=gen).tolist()
            for start in range(0, len(order), cfg.batch_size):
                batch = [train[i] for i in order[start : start + cfg.batch_size]]
                # Token-weighted accumulation: each micro-batch's mean loss is scaled by its share
                # of the batch's target tokens, so the step equals one big batch's mean.
                n_tok = sum(len(d.ids) - d.prompt_len for d in batch)
                loss_sum = 0.0
                for m0 in range(0, len(batch), micro):
                    mb = batch[m0 : m0 + micro]
                    ids, attn = pad_batch([d.ids for d in mb], tok.pad_token_id, device)
                    loss_mask = response_loss_mask(mb, attn).to(device)
                    with autocast(device, cfg.mixed_precision):
                        logits = model(input_ids=ids, attention_mask=attn).logits
                    loss = lm_loss(logits, ids, loss_mask)
                    share = sum(len(d.ids) - d.prompt_len for d in mb) / n_tok
                    (loss * share).backward()
                    loss_sum += loss.item() * share
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if not math.isfinite(loss_sum) or not torch.isfinite(grad_norm):
                    opt.zero_grad(set_to_none=True)  # NaN guard: skip the step
                else:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                row: dict[str, Any] = {
                    "epoch": epoch,
                    "loss": loss_sum,
                    "grad_norm": float(grad_norm),
                    "lr": sched.get_last_lr()[0],
                }
                end_of_epoch = start + cfg.batch_size >= len(order)
                due = (cfg.eval_every and step % cfg.eval_every == 0) or (
                    not cfg.eval_every and end_of_epoch
                )
                if due or step == total_steps:
                    m = evaluate()
                    row.update(m)
                    if better(m, best_metrics):
                        best_metrics, best_step = m, step
                        best_state = {
                            k: v.detach().to("cpu", copy=True)
                            for k, v in model.state_dict().items()
                        }
                mlog.log(step, row, show=("loss", "val_loss", "rm_score"))
                mlog.advance()

    assert best_state is not None and best_metrics is not None  # the last step always evaluates
    model.load_state_dict(best_state)
    metrics = {
        **best_metrics,
        "selected_step": best_step,
        "selected_by": select_by,
        "steps": total_steps,
        "train_examples": len(train),
        "val_examples": len(val),
    }
    return write_checkpoint(
        cfg.output_dir,
        model=model,
        tokenizer=tok,
        stage="sft",
        config=config_to_dict(cfg),
        metrics=metrics,
        parent_path=model_path,
        parent_version=cfg.parent_version,
        data_snapshot=cfg.data_snapshot or data_snapshot_of(cfg.train_path),
        save_dtype=cfg.save_dtype if cfg.save_dtype != "auto" else model_dtype_name(model_path),
        extra_files={"metrics.jsonl": log_path},
        overwrite=cfg.overwrite,
    )


def validation_loss(
    model: Any, val: list[Demonstration], tok: Any, device: torch.device, cfg: SFTConfig
) -> float:
    """Token-weighted mean NLL of the validation completions (eval mode, no dropout)."""
    import torch

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
    import torch

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


__all__ = ["Demonstration", "greedy_responses", "load_demonstrations", "run_sft"]
