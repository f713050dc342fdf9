"""What the three stages share: reading the export's files, turning rows into token ids, the
device and precision, seeding, residual dropout, and the per-step metrics log.

Heavy imports (torch, transformers) happen inside functions or in the stage modules, which
import this one; nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

# The machine's dtype choices live with the server's (one rule for every vLLM engine).
from instructloop.training.progress import PROGRESS_FILE_ENV, Progress, json_default  # noqa: F401

from instructloop.hardware import (  # noqa: F401  (re-exported for the stages)
    cpu_flags,
    cpu_native_bf16,
    engine_dtype,
    model_dtype_name,
)

if TYPE_CHECKING:
    import torch
    from instructloop.training.config import StageConfig
    from transformers import PreTrainedTokenizerBase

# No hub downloads at run time: every model here is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def offline_engine_env(kv_cache_gib: float) -> None:
    """Environment for an offline vLLM engine (`vllm.LLM`) started in this process: its CPU KV
    cache size, and no core held back for the scheduler. vLLM's CPU backend reserves one core
    for its scheduler process by default, which suits a server; an offline engine driven one
    `generate` batch at a time leaves that core idle, and on 2 cores it samples 1.5x faster
    without the reservation (288 -> 437 tok/s, 32 x 64 tokens, SmolLM2-135M, 2026-12-02).
    Variables the caller already set win; no effect on a GPU."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


class DataError(ValueError):
    """A training data file that cannot be used; the message names the file and line."""


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, *, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """All objects of a JSONL file. Blank lines are skipped; anything else that is not a JSON
    object, or lacks a `required` key, is an error naming the line."""
    p = Path(path)
    try:
        # "\n" only: str.splitlines() also breaks at U+2028, U+0085, \x1c..., which JSON keeps
        # raw inside strings (a sampled answer held a U+2028 and cut its row in two).
        lines = p.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise DataError(f"cannot read {p}: {e}") from e
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}:{n}: not JSON ({e})") from e
        if not isinstance(row, dict):
            raise DataError(f"{p}:{n}: expected a JSON object")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{p}:{n}: missing {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{p}: no rows")
    return rows


def data_snapshot_of(path: str | Path | None) -> str | None:
    """The export snapshot id of a data file: `snapshot_id` of the manifest.json beside it."""
    if not path:
        return None
    manifest = Path(path).parent / "manifest.json"
    try:
        return str(json.loads(manifest.read_text())["snapshot_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prompt_text_of(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str = "") -> str:
    """The exact text the policy sees for a data row.

    - "prompt_text": used as is (the export's field: what the engine saw, template applied);
    - "messages", or "prompt" as a list of messages: the tokenizer's chat template with the
      assistant turn opened (add_generation_prompt);
    - "prompt" as a string: a raw completion prompt, used as is.
    """
    if isinstance(row.get("prompt_text"), str):
        return row["prompt_text"]
    messages = row.get("messages")
    if messages is None and isinstance(row.get("prompt"), list):
        messages = row["prompt"]
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise DataError(f"{where}: messages must be a list of {{role, content}}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: chat messages given but the tokenizer has no chat template")
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    raise DataError(f"{where}: no prompt (prompt_text, prompt or messages)")


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    response: str,
    max_length: int,
    *,
    add_eos: bool = True,
) -> tuple[list[int], int]:
    """Token ids of prompt + response (+ EOS) and the prompt's length in tokens.

    The two parts are tokenised apart, so the boundary is exact (the loss mask and the reward's
    position depend on it) and matches what the engine does: it tokenises the prompt text and
    appends the tokens it samples. prompt_text already carries any special tokens (chat template),
    so none are added. When too long, the prompt is cut from the left: the response and the end
    of the prompt (the instruction just before the answer) matter most.
    """
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    if add_eos and tokenizer.eos_token_id is not None:
        r = [*r, tokenizer.eos_token_id]
    r = r[: max_length - 1]  # keep at least one prompt token
    keep = max_length - len(r)
    p = p[-keep:]
    return [*p, *r], len(p)


def split_rows(
    rows: list[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train/validation split. When rows carry "user_id", whole users go to one side (the paper
    splits by user id, §3.2, so the validation score is on people the model has not seen);
    otherwise rows are split at random. At least one row goes to each side."""
    if len(rows) < 2:
        raise DataError("need at least 2 rows to hold some out for validation")
    users = [r.get("user_id") for r in rows]
    if all(u is not None for u in users) and len(set(users)) >= 2:
        ordered = sorted(set(map(str, users)), key=lambda u: zlib.crc32(f"{seed}:{u}".encode()))
        n_val = max(1, round(len(ordered) * val_fraction))
        val_users = set(ordered[:n_val])
        val = [r for r in rows if str(r["user_id"]) in val_users]
        train = [r for r in rows if str(r["user_id"]) not in val_users]
        if train and val:
            return train, val
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    val_idx = set(idx[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [rows[i] for i in sorted(val_idx)]


# ---------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    return dev


def attention_implementation(name: str, device: torch.device) -> str:
    """The `attn_implementation` to load trained models with (see StageConfig)."""
    if name != "auto":
        return name
    return "eager" if device.type == "cpu" else "sdpa"


def train_model_kwargs(cfg: StageConfig, device: torch.device) -> dict[str, Any]:
    """`from_pretrained` keywords of a model a stage trains (or runs beside one it trains):
    float32 master weights, the stage's attention kernels."""
    import torch

    return {
        "dtype": torch.float32,
        "attn_implementation": attention_implementation(cfg.attn_implementation, device),
    }


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


def adamw(params: Any, *, lr: float = 1e-3, betas: tuple[float, float], weight_decay: float) -> Any:
    """AdamW, fused where torch has a fused kernel for the device (CPU and CUDA in torch >= 2.4:
    several times faster than the per-tensor loop on a 135M model). With parameter groups, each
    group's own "lr" wins over `lr`."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def resolve_model_path(path: str) -> str:
    """ "" means the default policy, built once by `instructloop model init`."""
    if path:
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} is not a model directory (no config.json)")
        return str(p)
    from instructloop.paths import default_model_dir

    p = default_model_dir()
    if not (p / "config.json").is_file():
        raise ValueError(f"default model {p} is missing: run `instructloop model init`")
    return str(p)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, with a pad token (EOS when it has none: padding positions
    are always masked out, so the value never reaches a loss)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to `[B, T]` ids and a `[B, T]` attention mask."""
    import torch

    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def add_residual_dropout(model: torch.nn.Module, p: float) -> list[Any]:
    """Dropout on every residual branch while the model trains (InstructGPT SFT: 0.2).

    GPT-2-style configs have the field (resid_pdrop) and get it set. Llama-family blocks add the
    attention and MLP outputs to the residual stream with no dropout at all, so here a forward
    hook drops out each `self_attn` / `mlp` block's output, which is what residual dropout is
    (GPT-2: dropout after attn.c_proj and mlp.c_proj). Hooks act only in train mode and are not
    saved, so checkpoints are unchanged. Returns the hook handles (call .remove() to undo).
    """
    import torch.nn.functional as F

    if p <= 0:
        return []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "resid_pdrop"):
        # GPT-2 family: the architecture has residual dropout; its modules took the config's
        # value at construction, so set both.
        config.resid_pdrop = p
        for mod_name, mod in model.named_modules():
            if mod_name.endswith(("attn.resid_dropout", "mlp.dropout")) and hasattr(mod, "p"):
                mod.p = p
        return []

    def hook(module: Any, _inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    handles = []
    for mod_name, mod in model.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "mlp") and ".layers." in f".{mod_name}":
            handles.append(mod.register_forward_hook(hook))
    return handles


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends one JSON object per step to a JSONL file (flushed each line, so a crashed run
    keeps its history), mirrors a few numbers on a tqdm bar, and, under a training cycle, keeps
    the latest step in the progress file ($INSTRUCTLOOP_PROGRESS_FILE)."""

    def __init__(self, path: str | Path, *, total: int, desc: str, progress: bool = True):
        from tqdm.auto import tqdm

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO = self.path.open("w", encoding="utf-8")
        self._t0 = time.time()
        self.bar = tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr)
        self.progress = Progress(desc, total)
        self.progress.update(0)

    def log(self, step: int, metrics: dict[str, Any], *, show: Sequence[str] = ()) -> None:
        row = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self._f.write(json.dumps(row, default=json_default) + "\n")
        self._f.flush()
        if show:
            self.bar.set_postfix({k: _fmt(metrics[k]) for k in show if k in metrics})
        self.progress.update(step, {k: metrics[k] for k in ("epoch", *show) if k in metrics})

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_log_path(output_dir: str, log_path: str | None) -> Path:
    if log_path:
        return Path(log_path)
    out = Path(output_dir)
    return out.parent / f"{out.name}.metrics.jsonl"


def _fmt(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
