"""Checkpoints: a Hugging Face safetensors directory plus `manifest.json`, written atomically.

Layout of a checkpoint directory:
- `config.json`, `model.safetensors` (or shards), `generation_config.json`: what
  `AutoModelForCausalLM` / `AutoModelForSequenceClassification` and vLLM load;
- the tokenizer files and chat template;
- `manifest.json`: format, stage, parent version and path, data snapshot, the stage's config,
  its metrics, and stage extras (the reward model's normalisation);
- `metrics.jsonl`: the per-step log of the run that made it.

Atomic: everything is written into a temporary sibling directory, then renamed into place, so
a reader (the registry, the server's hot swap) sees either no checkpoint or a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MANIFEST_NAME = "manifest.json"
FORMAT = "instructloop-checkpoint/1"


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class CheckpointInfo:
    """A written checkpoint: where it is and what its manifest says."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return str(self.manifest["stage"])

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics", {}))


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """A checkpoint directory and its manifest; CheckpointError when it is not one."""
    p = Path(path)
    try:
        manifest = json.loads((p / MANIFEST_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not an instructloop checkpoint ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{p}: unknown checkpoint format {manifest.get('format')!r}")
    return CheckpointInfo(p, manifest)


def save_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's state dict with tied duplicates dropped (lm_head when it is the embedding),
    as `save_pretrained` would write it: vLLM and transformers re-tie from the config."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def write_checkpoint(
    out_dir: str | Path,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    stage: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    parent_path: str | None,
    parent_version: str | None,
    data_snapshot: str | None,
    save_dtype: str,
    extra: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    overwrite: bool = False,
    config_updates: Mapping[str, Any] | None = None,
    before_rename: Callable[[Path], None] | None = None,
) -> CheckpointInfo:
    """Write `model` (in `save_dtype`, master weights untouched) with its tokenizer and a
    manifest into `out_dir`, atomically. `config_updates` are set on the saved config.json only.
    `before_rename(tmp_dir)` runs on the complete temporary directory (tests use it to fail a
    write half way). Returns the CheckpointInfo of the new directory."""
    import torch

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists (set overwrite to replace it)")
    dtype = getattr(torch, save_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"save_dtype {save_dtype!r} is not a torch dtype")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _save_weights(model, tmp, dtype, save_dtype, config_updates or {})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, src in (extra_files or {}).items():
            if Path(src).exists():
                shutil.copyfile(src, tmp / name)
        manifest = {
            "format": FORMAT,
            "stage": stage,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "parent_version": parent_version,
            "parent_path": parent_path,
            "data_snapshot": data_snapshot,
            "save_dtype": save_dtype,
            "config": dict(config),
            "metrics": dict(metrics),
            **(extra or {}),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, default=_jsonable))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
        if before_rename is not None:
            before_rename(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_checkpoint(out)


def _save_weights(
    model: PreTrainedModel,
    tmp: Path,
    dtype: torch.dtype,
    save_dtype: str,
    config_updates: Mapping[str, Any],
) -> None:
    """The weights in `dtype` and config.json, with `config_updates`, into `tmp`."""
    state = {k: v.detach().to("cpu", dtype) for k, v in save_state_dict(model).items()}
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    # save_pretrained writes the in-memory dtype (float32 master weights) into config.json;
    # the file must declare what is on disk, since vLLM and transformers load by it.
    cfg_path = tmp / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved.update({"dtype": save_dtype, "use_cache": True, **config_updates})
    saved.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is first renamed aside, then deleted, so at no
    point is a half-written directory visible under `out`."""
    if not out.exists():
        os.replace(tmp, out)
        return
    aside = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return repr(v)


__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "CheckpointError",
    "CheckpointInfo",
    "read_checkpoint",
    "save_state_dict",
    "write_checkpoint",
]
