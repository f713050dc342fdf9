"""The process a stage runs in: offline model loading, seeds, the device, the CPU allocator and
bf16 autocast.

Nothing here runs at import time: a stage calls these when it starts (training/stage.py), and
an in-process vLLM engine calls `offline_engine_env` before it is built.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from instructloop.training.config import StageConfig


def offline_hub() -> None:
    """No hub downloads: every model a stage loads is a local directory. huggingface_hub reads
    these variables when it is first imported, so this runs before transformers or vLLM are.
    Variables the caller already set win."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def offline_engine_env(kv_cache_gib: float) -> None:
    """Environment for an offline vLLM engine (`vllm.LLM`) started in this process: offline
    (`offline_hub`), its CPU KV cache size, and no core held back for the scheduler. vLLM's CPU
    backend reserves one core for its scheduler process by default, which suits a server; an
    offline engine driven one `generate` batch at a time leaves that core idle, and on a small
    CPU that idle core is a large share of the sampling speed. Variables the caller already set
    win; no effect on a GPU."""
    offline_hub()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def set_seed(seed: int) -> None:
    """Seed Python's `random`, numpy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when there is one, else the CPU; an explicit CUDA device must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    return dev


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """glibc malloc: serve large blocks from the heap and never trim it (M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD), so the tensors a training step frees are reused by the next step instead
    of being unmapped and page-faulted in again. Once per process; False where there is no glibc
    (macOS, musl) or it refused."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    _ALLOCATOR_TUNED = ok
    return ok


def prepare_runtime(cfg: StageConfig, device: torch.device) -> None:
    """Process-level settings a stage asks for before it loads models."""
    if device.type == "cpu" and cfg.cpu_allocator_tuning:
        tune_cpu_allocator()


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast around forward passes (weights stay float32), or nothing."""
    import torch

    use = mixed_precision == "bf16" or (
        mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


__all__ = [
    "autocast",
    "offline_engine_env",
    "offline_hub",
    "prepare_runtime",
    "resolve_device",
    "set_seed",
    "tune_cpu_allocator",
]
