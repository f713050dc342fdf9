"""Copies of a checkpoint for the weight-swap checks (tests/test_weight_sync.py,
tests/serving/test_hot_swap.py, benchmarks/swap.py): one with every tensor changed, and
hand-edited broken ones."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def perturb_checkpoint(src: Path, dst: Path, *, sigma: float = 0.05, seed: int = 0) -> Path:
    """Copy `src` to `dst` with every tensor changed: Gaussian noise of `sigma` times the
    tensor's std added to matrices (embeddings included), and norm weights scaled by
    (1 + sigma * noise). Big enough to change greedy outputs, small enough to keep text sane."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def perturb(state: dict[str, Any]) -> None:
        for name in sorted(state):
            t = state[name].float()
            noise = torch.randn(t.shape, generator=gen)
            new = (t * (1 + sigma * noise) if t.ndim == 1 else t + sigma * t.std() * noise).to(
                state[name].dtype
            )
            assert not torch.equal(new, state[name]), name
            state[name] = new

    return edit_checkpoint(src, dst, perturb)


def edit_checkpoint(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Copy `src` to `dst` with `edit` applied to its state dict (in place)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


BROKEN = ("truncated", "random_bytes", "architecture", "symlink")
"""The bad checkpoints the probe registered (issue: "Checkpoints are verified before they can go
live"), as `broken_checkpoint` makes them."""


def broken_checkpoint(src: Path, dst: Path, how: str) -> Path:
    """A copy of `src` broken one way: "truncated" (the weights cut to half their size),
    "random_bytes" (the weights replaced by 1,000 random bytes), "architecture" (config.json's
    hidden_size doubled, so no tensor fits it), "symlink" (tokenizer.json a link to a system
    file, outside any checkpoint root)."""
    import json
    import os

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "truncated":
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif how == "random_bytes":
        weights.write_bytes(os.urandom(1000))
    elif how == "architecture":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["hidden_size"] *= 2
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    elif how == "symlink":
        (dst / "tokenizer.json").unlink()
        (dst / "tokenizer.json").symlink_to("/etc/passwd")
    else:
        raise ValueError(f"unknown breakage {how!r}; one of {BROKEN}")
    return dst
