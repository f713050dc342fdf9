"""Does a checkpoint (or a state dict) fit the running engine? Checked in the caller's process,
from file headers and the architecture's own parameter list, before anything is paused, so a bad
checkpoint changes nothing."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructloop.weight_sync.config import WeightSyncError

if TYPE_CHECKING:
    import torch

# Config keys that do not change what the network computes at inference time; a checkpoint may
# differ from the running engine in them (training writes use_cache=False, dropout, its version).
_CONFIG_KEYS_IGNORED = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "pad_token_id",
        "initializer_range",
        "id2label",
        "label2id",
        "problem_type",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

# safetensors dtype names vLLM casts to the engine's dtype on load.
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"
    file: Path


def read_safetensors_index(checkpoint_dir: str | Path) -> dict[str, TensorSpec]:
    """Name -> shape, dtype, file of every tensor in a safetensors checkpoint directory, from the
    file headers only. Raises WeightSyncError on a missing, truncated or malformed file."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise WeightSyncError(f"checkpoint {ckpt} is not a directory")
    index_file = ckpt / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightSyncError(f"{index_file}: unreadable index ({e})") from e
        files = sorted({ckpt / name for name in weight_map.values()})
    else:
        files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise WeightSyncError(f"checkpoint {ckpt} has no *.safetensors files")

    specs: dict[str, TensorSpec] = {}
    for path in files:
        for name, spec in _read_safetensors_header(path).items():
            if name in specs:
                raise WeightSyncError(f"{path}: tensor {name!r} also appears in another file")
            specs[name] = spec
    return specs


def _read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    # Format: u64 little-endian header length, JSON header, then the raw data.
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, struct.error) as e:
        raise WeightSyncError(f"{path}: not a readable safetensors file ({e})") from e
    data_len = size - 8 - header_len
    out: dict[str, TensorSpec] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightSyncError(f"{path}: bad header entry for {name!r}") from e
        if not 0 <= begin <= end <= data_len:
            raise WeightSyncError(f"{path}: tensor {name!r} lies past the end of the file")
        out[name] = TensorSpec(shape, dtype, path)
    return out


@dataclass(frozen=True)
class Expected:
    """The tensors an architecture's checkpoint holds: the required ones with their shapes, and
    the tied duplicates a checkpoint may also store."""

    required: dict[str, tuple[int, ...]]  # name -> shape
    tied: dict[str, str]  # duplicate name -> the required name it aliases (lm_head -> embed)


@lru_cache(maxsize=8)
def _expected_tensors(config_json: str) -> Expected:
    """The tensors a Hugging Face checkpoint of this config holds, from transformers' own model
    class built on the meta device (no memory, no weights): the reference is the architecture the
    engine runs, not another checkpoint's files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    required: dict[str, tuple[int, ...]] = {}
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():  # a tied parameter is listed once
        required[name] = tuple(p.shape)
        canonical[id(p)] = name
    non_persistent = {
        f"{mod_name}.{b}" if mod_name else b
        for mod_name, mod in model.named_modules()
        for b in mod._non_persistent_buffers_set
    }
    for name, buf in model.named_buffers():
        if name not in non_persistent:
            required[name] = tuple(buf.shape)
    tied = {
        name: canonical[id(t)]
        for name, t in model.state_dict(keep_vars=True).items()
        if name not in required and id(t) in canonical
    }
    return Expected(required, tied)


def expected_for(running_cfg: Any) -> Expected:
    """`Expected` for the engine's Hugging Face config (cached per config)."""
    try:
        return _expected_tensors(json.dumps(running_cfg.to_dict(), sort_keys=True, default=str))
    except Exception as e:  # e.g. an architecture transformers cannot build without remote code
        raise WeightSyncError(
            f"cannot build the reference tensor list for the running architecture ({e})"
        ) from e


def _inference_config(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in _CONFIG_KEYS_IGNORED and "dropout" not in k}


def model_config(llm: Any) -> Any:
    """vLLM's ModelConfig of an AsyncLLM or of the offline vllm.LLM (kept on its LLMEngine)."""
    mc = getattr(llm, "model_config", None)
    return mc if mc is not None else llm.llm_engine.model_config


def validate_checkpoint(llm: Any, checkpoint_dir: str | Path) -> dict[str, TensorSpec]:
    """Check that `checkpoint_dir` fits the running engine: same architecture and inference
    config, every tensor present with the right shape, float dtypes, no unknown tensors, files not
    truncated, tied duplicates (if stored) equal to what they alias. Returns the tensor index.
    Raises WeightSyncError. Reads headers only (plus the tied duplicates, if present)."""
    from transformers import AutoConfig

    ckpt = Path(checkpoint_dir)
    if not (ckpt / "config.json").is_file():
        raise WeightSyncError(f"checkpoint {ckpt} has no config.json")
    try:
        new_cfg = AutoConfig.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad config
        raise WeightSyncError(f"{ckpt}/config.json: unreadable ({e})") from e
    running_cfg = model_config(llm).hf_config
    a, b = _inference_config(running_cfg), _inference_config(new_cfg)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        details = ", ".join(f"{k}: engine {a.get(k)!r}, checkpoint {b.get(k)!r}" for k in diff)
        raise WeightSyncError(f"{ckpt}: config differs from the running engine's ({details})")

    specs = read_safetensors_index(ckpt)
    expected = expected_for(running_cfg)
    check_specs(expected, {n: (s.shape, s.dtype) for n, s in specs.items()}, str(ckpt))
    stored_dups = [n for n in expected.tied if n in specs]
    if stored_dups:
        _check_tied_equal_on_disk(specs, expected, stored_dups, ckpt)
    return specs


def warm_validation(llm: Any) -> None:
    """Build (and cache) the running architecture's reference tensor list now, so the first
    `validate_checkpoint` does not pay for it (transformers' model classes on the meta device).
    A server that follows the registry calls it at start, off the event loop."""
    expected_for(model_config(llm).hf_config)


def check_specs(
    expected: Expected, specs: Mapping[str, tuple[tuple[int, ...], str]], where: str
) -> None:
    required = expected.required

    def want(name: str) -> tuple[int, ...]:
        return required[expected.tied.get(name, name)]

    known = required.keys() | expected.tied.keys()
    missing = sorted(required.keys() - specs.keys())
    unknown = sorted(specs.keys() - known)
    wrong = sorted(
        f"{n} {list(specs[n][0])} (expected {list(want(n))})"
        for n in specs.keys() & known
        if tuple(specs[n][0]) != want(n)
    )
    bad_dtype = sorted(f"{n} {d}" for n, (_, d) in specs.items() if d not in _FLOAT_DTYPES)
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unknown:
        problems.append(f"unknown tensors {_few(unknown)}")
    if wrong:
        problems.append(f"wrong shapes {_few(wrong)}")
    if bad_dtype:
        problems.append(f"non-float dtypes {_few(bad_dtype)}")
    if problems:
        raise WeightSyncError(f"{where} does not fit the running engine: " + "; ".join(problems))


def _check_tied_equal_on_disk(
    specs: Mapping[str, TensorSpec], expected: Expected, names: list[str], ckpt: Path
) -> None:
    # A stored lm_head.weight that differs from embed_tokens.weight would be ignored by a fresh
    # engine and by transformers (both tie), but written over the embedding by an in-place reload.
    import torch
    from safetensors import safe_open

    def read(name: str) -> torch.Tensor:
        with safe_open(str(specs[name].file), framework="pt") as f:
            return f.get_tensor(name)

    for dup in names:
        if not torch.equal(read(dup), read(expected.tied[dup])):
            raise WeightSyncError(
                f"{ckpt}: {dup} differs from {expected.tied[dup]}, which it is tied to in this "
                "architecture (tie_word_embeddings); save the checkpoint from the tied model"
            )


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
