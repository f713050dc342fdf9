"""The optimiser of every stage (AdamW), its learning-rate schedules, and the guarded step that
skips a non-finite update instead of writing NaNs into the weights."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from instructloop.training.losses import cosine_lr_factor


def adamw(params: Any, *, lr: float = 1e-3, betas: tuple[float, float], weight_decay: float) -> Any:
    """AdamW, fused where torch has a fused kernel for the device (CPU and CUDA in torch >= 2.4),
    which is several times faster than the per-tensor loop. With parameter groups, each group's
    own "lr" wins over `lr`."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def cosine_schedule(
    opt: torch.optim.Optimizer, total_steps: int, final_fraction: float, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay to `final_fraction` of the peak over `total_steps` (InstructGPT SFT and RM:
    to 10%, no warm-up)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr_factor(s, total_steps, final_fraction, warmup_steps)
    )


def warmup_constant_schedule(
    opt: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up over `warmup_steps`, then constant (InstructGPT PPO: 10 iterations)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
    )


def guarded_step(
    opt: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    max_grad_norm: float,
    loss: float,
) -> torch.Tensor:
    """Clip the gradient norm, step unless the loss or the norm is not finite (a NaN guard: that
    step is skipped), and clear the gradients. Returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if math.isfinite(loss) and torch.isfinite(grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


__all__ = ["adamw", "cosine_schedule", "guarded_step", "warmup_constant_schedule"]
