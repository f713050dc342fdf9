"""What this machine computes well: the CPU's bf16 support, and the dtype a vLLM engine should
run a checkpoint in. Shared by the server (serving/engine.py) and training's offline engines."""

from __future__ import annotations

import json
from pathlib import Path


def model_dtype_name(model_path: str | Path) -> str:
    """The dtype a HF directory's config declares ("bfloat16" when it says nothing)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return "bfloat16"
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    return str(name)


def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of this machine's CPU (empty where /proc/cpuinfo has none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def engine_dtype(model_path: str | Path, dtype: str = "auto") -> str:
    """dtype for a vLLM engine over `model_path`. "auto": the dtype the checkpoint declares
    (vLLM's own "auto" would run a float32 checkpoint in 16 bits), except a 16-bit checkpoint on
    a CPU without native bf16, which runs in float32: on a 2-core AVX2-only EPYC vLLM's bf16
    path generated 54 tok/s against 255 in float32 (SmolLM2-135M, 32 x 64 greedy tokens,
    2026-12-03). A hub id (no local config) keeps vLLM's "auto" where bf16 is native."""
    if dtype != "auto":
        return dtype
    local = (Path(model_path) / "config.json").is_file()
    name = model_dtype_name(model_path) if local else "auto"
    if name in ("bfloat16", "float16", "auto") and not cpu_native_bf16():
        import torch

        if not torch.cuda.is_available():
            return "float32"
    return name
