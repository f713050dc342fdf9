"""Training the reward model: `run_reward_model(cfg)` (InstructGPT §3.5, App. C.2).

1. reads rankings (K responses per prompt, best first, equal ranks = ties);
2. trains with eq. 1, all C(K, 2) pairs of one prompt as ONE batch element (rankings.py);
3. one epoch, cosine decay to 10% (paper);
4. adds a bias so the reference responses (demonstrations) score a mean of 0 (paper), and stores
   the bias and the reference scores' std (for PPO's reward normalisation, as OpenRLHF does) in
   config.json and the manifest;
5. reports pairwise accuracy on held-out rankings (paper: about 70%).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from instructloop.errors import ConfigError
from instructloop.training.checkpoint import CheckpointInfo
from instructloop.training.config import RewardModelConfig
from instructloop.training.datafiles import DataError, load_demonstrations, train_and_validation
from instructloop.training.losses import kway_ranking_loss, ordered_pairs, pairwise_accuracy
from instructloop.training.models import pad_batch, train_model_kwargs
from instructloop.training.optim import adamw, cosine_schedule, guarded_step
from instructloop.training.progress import Progress
from instructloop.training.reward_model.head import (
    BIAS_KEY,
    STD_KEY,
    backbone_and_head,
    reward_pad_token_id,
    sequence_rewards,
)
from instructloop.training.reward_model.rankings import (
    RankingGroup,
    group_rewards,
    load_rankings,
    pack_groups,
)
from instructloop.training.runtime import autocast
from instructloop.training.stage import Stage, start_stage
from instructloop.training.trunk import freeze_lower, lower_hidden

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def run_reward_model(cfg: RewardModelConfig) -> CheckpointInfo:
    """Train a reward model on `cfg.train_path` rankings; write it to `cfg.output_dir`."""
    stage = start_stage(cfg, data_field="train_path", model_field="model_path")
    device = stage.device
    train, val, reference = load_data(cfg, stage.tokenizer)
    pad_id = reward_pad_token_id(stage.tokenizer)
    model, n_frozen = load_reward_model(stage, cfg, pad_id)
    lower = None
    if cfg.trainable_layers is not None:
        # The frozen trunk's output never changes: compute it once for every epoch.
        lower = trunk_outputs(model, train, pad_id, device, cfg, n_frozen)
    opt = reward_optimizer(model, cfg)
    total_steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = cosine_schedule(opt, total_steps, cfg.lr_final_fraction, cfg.warmup_steps)

    gen = torch.Generator().manual_seed(cfg.seed)
    micro = cfg.batch_size // cfg.grad_accum
    step = 0
    model.train()
    with stage.metrics_log(total=total_steps, desc="reward model") as ml:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(train), generator=gen).tolist()
            for start in range(0, len(order), cfg.batch_size):
                batch = [train[i] for i in order[start : start + cfg.batch_size]]
                loss, correct, pairs = accumulate_gradients(
                    model, batch, pad_id, device, cfg, lower=lower, n_frozen=n_frozen
                )
                grad_norm = guarded_step(opt, model.parameters(), cfg.max_grad_norm, loss)
                sched.step()
                step += 1
                ml.log(
                    step,
                    {
                        "epoch": epoch,
                        "loss": loss,
                        "accuracy": correct / max(pairs, 1),
                        "grad_norm": float(grad_norm),
                        "lr": sched.get_last_lr()[0],
                    },
                    show=("loss", "accuracy"),
                )
                ml.advance()

    model.eval()
    norm = reference_normalization(model, reference, pad_id, device, micro, cfg.mixed_precision)
    val_metrics = evaluate_rankings(model, val, pad_id, device, micro, cfg.mixed_precision)
    metrics = {
        **val_metrics,
        "train_groups": len(train),
        "val_groups": len(val),
        "steps": total_steps,
        "reference_mean_before_bias": -norm["bias"],
        "reference_std": norm["std"],
    }
    return stage.write_checkpoint(
        model,
        name="rm",
        metrics=metrics,
        extra={"reward_normalization": norm},
        config_updates={BIAS_KEY: norm["bias"], STD_KEY: norm["std"]},
    )


def load_data(
    cfg: RewardModelConfig, tok: PreTrainedTokenizerBase
) -> tuple[list[RankingGroup], list[RankingGroup], list[list[int]]]:
    """(training groups, held-out groups, reference sequences). The held-out split goes by user
    when the rows say who ranked; a training group with no strict preference is dropped (it
    teaches nothing). The reference set is `reference_path`'s demonstrations, else the best
    response of each training ranking."""

    def rankings(path: str) -> list[tuple[dict[str, Any], RankingGroup]]:
        return load_rankings(path, tok, cfg.max_length, cfg.max_responses)

    train, val = train_and_validation(
        rankings(cfg.train_path),
        rankings(cfg.val_path) if cfg.val_path else None,
        cfg.val_fraction,
        cfg.seed,
    )
    train = [g for g in train if ordered_pairs(g.ranks)]
    if not train:
        raise DataError(f"{cfg.train_path}: no ranking with at least one strict preference")
    if cfg.reference_path:
        reference = [d.ids for _, d in load_demonstrations(cfg.reference_path, tok, cfg.max_length)]
    else:
        best = [min(range(len(g.ranks)), key=lambda i: g.ranks[i]) for g in train]
        reference = [g.seqs[i] for g, i in zip(train, best, strict=True)]
    return train, val, reference


def load_reward_model(stage: Stage, cfg: RewardModelConfig, pad_id: int) -> tuple[Any, int]:
    """(backbone + a new scalar head, the number of frozen bottom layers). The head starts small
    and random, as OpenRLHF's: std 1/(d+1)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        stage.model_path, num_labels=1, **train_model_kwargs(cfg, stage.device)
    ).to(stage.device)
    model.config.pad_token_id = pad_id
    model.config.use_cache = False
    body, head = backbone_and_head(model)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / (model.config.hidden_size + 1))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    try:
        n_frozen = freeze_lower(body, cfg.trainable_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return model, n_frozen


def reward_optimizer(model: Any, cfg: RewardModelConfig) -> Any:
    """AdamW over the trainable backbone at `lr` and the new head at `head_lr`."""
    head_params = list(backbone_and_head(model)[1].parameters())
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    return adamw(
        [
            {"params": body_params, "lr": cfg.lr},
            {"params": head_params, "lr": cfg.head_lr or cfg.lr},
        ],
        betas=cfg.adam_betas,
        weight_decay=cfg.weight_decay,
    )


def reference_normalization(
    model: Any,
    reference: list[list[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    mixed_precision: str,
) -> dict[str, Any]:
    """The bias that makes the reference responses score a mean of 0 (paper), and their std,
    by which PPO normalises rewards: {"bias", "mean": 0, "std", "n_reference"}."""
    scores = score_sequences(model, reference, pad_id, device, batch_size, mixed_precision)
    mean = sum(scores) / len(scores)
    var = sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1, 1)
    return {
        "bias": -mean,
        "mean": 0.0,
        "std": max(math.sqrt(var), 1e-6),
        "n_reference": len(scores),
    }


def accumulate_gradients(
    model: Any,
    batch: list[RankingGroup],
    pad_id: int,
    device: torch.device,
    cfg: RewardModelConfig,
    *,
    lower: dict[int, torch.Tensor] | None,
    n_frozen: int,
) -> tuple[float, int, int]:
    """Backward passes of eq. 1 over `batch` in `cfg.grad_accum` micro-batches: the loss of each
    prompt, averaged over the batch's prompts. Returns (loss, correctly ordered pairs, pairs)."""
    micro = cfg.batch_size // cfg.grad_accum
    loss_sum, correct, pairs = 0.0, 0, 0
    for m0 in range(0, len(batch), micro):
        mb = batch[m0 : m0 + micro]
        with autocast(device, cfg.mixed_precision):
            rewards = group_rewards(model, mb, pad_id, device, lower=lower, n_frozen=n_frozen)
        losses = [kway_ranking_loss(r, g.ranks) for r, g in zip(rewards, mb, strict=True)]
        loss = torch.stack(losses).sum() / len(batch)
        loss.backward()
        loss_sum += loss.item()
        for r, g in zip(rewards, mb, strict=True):
            c, n = pairwise_accuracy(r.detach(), g.ranks)
            correct, pairs = correct + c, pairs + n
    return loss_sum, correct, pairs


def trunk_outputs(
    model: Any,
    groups: list[RankingGroup],
    pad_id: int,
    device: torch.device,
    cfg: RewardModelConfig,
    n_frozen: int,
) -> dict[int, torch.Tensor]:
    """Each group's packed row through the frozen trunk, once: `[L, H]` by id(group).
    Length-sorted micro-batches, so little is padded."""
    body = backbone_and_head(model)[0]
    ordered = sorted(groups, key=lambda g: len(g.prompt) + sum(map(len, g.responses)))
    out: dict[int, torch.Tensor] = {}
    step = max(1, cfg.batch_size // cfg.grad_accum)
    progress = Progress("reward model: frozen trunk", len(ordered))
    for i in range(0, len(ordered), step):
        progress.update(i)
        chunk = ordered[i : i + step]
        packed = pack_groups(chunk, pad_id, device, model.config._attn_implementation)
        with autocast(device, cfg.mixed_precision):
            h = lower_hidden(
                body,
                packed.input_ids,
                packed.attention_mask,
                n_frozen,
                position_ids=packed.position_ids,
            )
        for row, (g, n) in enumerate(zip(chunk, packed.lengths, strict=True)):
            out[id(g)] = h[row, :n].clone()
    progress.update(len(ordered))
    return out


def score_sequences(
    model: PreTrainedModel,
    seqs: list[list[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    mixed_precision: str = "no",
) -> list[float]:
    """Raw head outputs (no bias) of token id sequences."""
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, attn = pad_batch(seqs[i : i + batch_size], pad_id, device)
            with autocast(device, mixed_precision):
                out.extend(sequence_rewards(model, ids, attn).float().tolist())
    return out


def evaluate_rankings(
    model: PreTrainedModel,
    groups: list[RankingGroup],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    mixed_precision: str = "no",
) -> dict[str, float]:
    """Held-out pairwise accuracy (over strictly ordered pairs) and eq. 1 loss (mean over
    prompts that have pairs)."""
    correct = pairs = 0
    losses: list[float] = []
    with torch.no_grad():
        for i in range(0, len(groups), max(1, batch_size)):
            mb = groups[i : i + batch_size]
            with autocast(device, mixed_precision):
                rewards = group_rewards(model, mb, pad_id, device)
            for r, g in zip(rewards, mb, strict=True):
                c, n = pairwise_accuracy(r.float(), g.ranks)
                correct, pairs = correct + c, pairs + n
                if n:
                    losses.append(kway_ranking_loss(r.float(), g.ranks).item())
    return {
        "val_accuracy": correct / pairs if pairs else float("nan"),
        "val_pairs": pairs,
        "val_loss": sum(losses) / len(losses) if losses else float("nan"),
    }


__all__ = ["evaluate_rankings", "run_reward_model", "score_sequences", "trunk_outputs"]
