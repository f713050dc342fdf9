"""Is a checkpoint directory what it claims to be? Checked before the registry accepts it, so a
truncated, foreign or hostile directory never becomes a version that could go live.

`verify_checkpoint(path, how="static")`, from the files and the architecture only (no weights
loaded, no engine):
- the directory and everything in it lie under the checkpoint roots (`paths.checkpoint_roots`):
  every entry is resolved, and a symlink that leaves the roots is refused, so registering cannot
  point the servers at a system file;
- the safetensors files are whole: each header is JSON of the stated length, each tensor's byte
  range holds exactly its shape and dtype, the ranges follow each other without gaps, and the
  header plus the last range is the file's size (a truncated or padded file fails here); an
  index json names only files that exist in the directory and agrees with them;
- the tensors are the architecture's: names and shapes of transformers' model class for
  config.json, built on the meta device (no memory, no weights; instructloop.weight_sync), with
  tied duplicates (lm_head under tie_word_embeddings) optional; every tensor a float of the
  dtype config.json declares;
- the tokenizer loads, has no more tokens than the embedding has rows, and carries a chat
  template that renders.

`how="load"` also starts a CPU (or GPU) vLLM engine on the checkpoint in a child process and
generates a few tokens (`verify_load`): what a server will do with it, without a server.

Every failure is a `CheckpointRejected` whose message is one line naming the file and the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructloop.paths import CHECKPOINT_ROOTS_ENV, checkpoint_roots
from instructloop.registry.versions import VERIFICATIONS, CheckpointRejected

MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on a header; a larger length is not a safetensors file."""
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""One of these is the tokenizer itself (fast, sentencepiece, or BPE vocabulary)."""
STATIC_TIMEOUT_S = 300.0
"""The static checks in a child: importing torch and transformers, then reading headers."""
LOAD_TIMEOUT_S = 600.0
"""A load check that takes longer is refused: a server would not start on it either."""
LOAD_MAX_TOKENS = 4
"""Tokens the load check generates: enough to show the engine runs the weights end to end."""
_RESULT_MARK = "instructloop-verify-load:"

# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_CONFIG_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(frozen=True)
class CheckpointSummary:
    """What a verified checkpoint holds."""

    path: Path
    architecture: str
    tensors: int
    parameters: int
    dtype: str
    verified: str
    """"static" or "load"."""

    def describe(self) -> str:
        return (
            f"{self.architecture}, {self.tensors} tensors, {self.parameters:,} parameters in "
            f"{self.dtype}; verified: {self.verified}"
        )


def verify_checkpoint(
    path: str | Path, *, how: str = "static", roots: Sequence[str | Path] | None = None
) -> CheckpointSummary:
    """All the checks for `how` ("static" or "load") on the directory `path`, which must lie
    under `roots` (None: the configured checkpoint roots). Raises CheckpointRejected."""
    if how not in VERIFICATIONS:
        raise ValueError(f"how must be one of {VERIFICATIONS}, got {how!r}")
    real = check_roots(path, checkpoint_roots() if roots is None else roots)
    # The architecture check builds the model class on the meta device, which takes torch and
    # transformers: a process without them yet (the training worker at the gate step, the CLI)
    # checks in a child rather than keep their memory for good.
    summary = verify_files(real) if "torch" in sys.modules else _verify_files_in_child(real)
    if how == "load":
        verify_load(real)
    return dataclasses.replace(summary, verified=how)


# --- roots -------------------------------------------------------------------------------------


def check_roots(path: str | Path, roots: Sequence[str | Path]) -> Path:
    """`path` resolved; CheckpointRejected unless it and every entry in it (each symlink
    resolved) lie under one of `roots`. Symlinked directories are checked, not descended: the
    loaders read the checkpoint's own files."""
    bounds = [Path(r).expanduser().resolve() for r in roots]
    p = Path(path).expanduser()
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointRejected(f"checkpoint directory {p} does not exist ({e})") from e
    if not real.is_dir():
        raise CheckpointRejected(f"{p} is not a directory")

    def inside(x: Path) -> bool:
        return any(x == b or x.is_relative_to(b) for b in bounds)

    if not inside(real):
        where = ", ".join(str(b) for b in bounds) or "none configured"
        raise CheckpointRejected(
            f"{real} lies outside the checkpoint roots ({where}); move it under one, or add its "
            f"directory to {CHECKPOINT_ROOTS_ENV}"
        )
    for dirpath, dirnames, filenames in os.walk(real):  # does not follow directory links
        for name in (*dirnames, *filenames):
            entry = Path(dirpath) / name
            try:
                target = entry.resolve(strict=True)
            except (OSError, RuntimeError) as e:
                raise CheckpointRejected(f"{entry} is a broken or looping symlink ({e})") from e
            if not inside(target):
                raise CheckpointRejected(
                    f"{entry} is a symlink to {target}, outside the checkpoint roots"
                )
    return real


# --- weights -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]
    dtype: str
    file: str


def read_weights(path: Path) -> dict[str, _Tensor]:
    """Every tensor of the checkpoint from its headers, each file checked whole."""
    index = path / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise ValueError("weight_map is not an object of tensor -> file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointRejected(f"{index}: unreadable index ({_one_line(e)})") from e
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointRejected(f"{index} names {name!r}, not a file in the directory")
            if not (path / name).is_file():
                raise CheckpointRejected(f"{index} names {name}, which does not exist")
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointRejected(f"{path} holds no *.safetensors weights")
    out: dict[str, _Tensor] = {}
    for f in files:
        for name, t in _read_header(f).items():
            if name in out:
                raise CheckpointRejected(f"{f}: tensor {name} is also in {out[name].file}")
            out[name] = t
    if weight_map is not None:
        stray = sorted(n for n in out if n not in weight_map)
        wrong = sorted(n for n, f in weight_map.items() if n not in out or out[n].file != f)
        if stray or wrong:
            raise CheckpointRejected(
                f"{index} disagrees with the files: "
                + "; ".join(
                    s
                    for s in (
                        f"not in the index: {_few(stray)}" if stray else "",
                        f"not in the file it names: {_few(wrong)}" if wrong else "",
                    )
                    if s
                )
            )
    return out


def _read_header(f: Path) -> dict[str, _Tensor]:
    # Format: u64 little-endian header length, a JSON header, then the tensors' bytes.
    size = f.stat().st_size
    if size < 8:
        raise CheckpointRejected(f"{f}: {size} bytes, too short for a safetensors header")
    with f.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointRejected(
                f"{f}: not a safetensors file, or truncated (header of {n} bytes in a file of "
                f"{size})"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointRejected(f"{f}: unreadable safetensors header ({_one_line(e)})") from e
    out: dict[str, _Tensor] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointRejected(f"{f}: bad header entry for {name!r} ({e!r})") from e
        if dtype not in _DTYPE_BYTES or any(d < 0 for d in shape):
            raise CheckpointRejected(f"{f}: tensor {name} has dtype {dtype} and shape {shape}")
        want = math.prod(shape) * _DTYPE_BYTES[dtype]
        if end - begin != want:
            raise CheckpointRejected(
                f"{f}: tensor {name} spans {end - begin} bytes; {dtype} {list(shape)} needs {want}"
            )
        ranges.append((begin, end, name))
        out[name] = _Tensor(shape, dtype, f.name)
    pos = 0
    for begin, end, name in sorted(ranges):
        if begin != pos:
            raise CheckpointRejected(
                f"{f}: tensor {name} starts at byte {begin}, not {pos} (overlap or gap)"
            )
        pos = end
    if 8 + n + pos != size:
        raise CheckpointRejected(
            f"{f}: the header covers {8 + n + pos} bytes but the file has {size} "
            f"({'truncated' if size < 8 + n + pos else 'trailing bytes'})"
        )
    return out


# --- architecture ------------------------------------------------------------------------------


def _load_config(path: Path) -> tuple[Any, dict[str, Any]]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointRejected(f"{path} has no config.json")
    try:
        raw = json.loads(cfg_file.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointRejected(f"{cfg_file}: unreadable ({_one_line(e)})") from e
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises several types for a config it cannot use
        raise CheckpointRejected(f"{cfg_file}: not a usable config ({_one_line(e)})") from e
    return config, raw


def check_architecture(
    config: Any, raw_config: dict[str, Any], tensors: dict[str, _Tensor], where: Path
) -> str:
    """The tensors are exactly those of config.json's architecture, in its dtype; the dtype."""
    from instructloop.weight_sync.checkpoint import expected_for
    from instructloop.weight_sync.config import WeightSyncError

    try:
        expected = expected_for(config)
    except WeightSyncError as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise CheckpointRejected(
            f"{where}/config.json: transformers cannot build its architecture ({_one_line(cause)})"
        ) from e
    required, tied = expected.required, expected.tied

    def want(name: str) -> tuple[int, ...]:
        return required[tied.get(name, name)]

    known = required.keys() | tied.keys()
    declared_name = str(raw_config.get("dtype") or raw_config.get("torch_dtype") or "")
    declared = _CONFIG_DTYPES.get(declared_name)
    missing = sorted(required.keys() - tensors.keys())
    unknown = sorted(tensors.keys() - known)
    wrong = sorted(
        f"{n} {list(t.shape)} (expected {list(want(n))})"
        for n, t in tensors.items()
        if n in known and t.shape != want(n)
    )
    bad_dtype = sorted(
        f"{n} {t.dtype}"
        for n, t in tensors.items()
        if t.dtype not in _FLOAT_DTYPES or (declared is not None and t.dtype != declared)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unknown:
        problems.append(f"unknown tensors {_few(unknown)}")
    if wrong:
        problems.append(f"wrong shapes {_few(wrong)}")
    if bad_dtype:
        problems.append(
            f"dtypes other than config.json's {declared_name} {_few(bad_dtype)}"
            if declared
            else f"non-float dtypes {_few(bad_dtype)}"
        )
    if problems:
        arch = type(config).__name__.removesuffix("Config") or "model"
        raise CheckpointRejected(
            f"{where}: weights do not match the {arch} architecture in config.json: "
            + "; ".join(problems)
        )
    dtypes = sorted({t.dtype for t in tensors.values()})
    return declared or ",".join(dtypes)


# --- tokenizer ---------------------------------------------------------------------------------


def check_tokenizer(path: Path, config: Any) -> None:
    """The tokenizer loads, fits the embedding, and has a chat template that renders."""
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise CheckpointRejected(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a malformed file raises whatever its parser raises
        raise CheckpointRejected(f"{path}: the tokenizer does not load ({_one_line(e)})") from e
    if not getattr(tok, "chat_template", None):
        raise CheckpointRejected(
            f"{path} has no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json); the server renders every chat request with it"
        )
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str) or not text:
            raise ValueError(f"it rendered {text!r}")
    except Exception as e:  # jinja raises its own types
        raise CheckpointRejected(
            f"{path}: the chat template does not render ({_one_line(e)})"
        ) from e
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_cfg, "vocab_size", None)
    if isinstance(vocab, int) and len(tok) > vocab:
        raise CheckpointRejected(
            f"{path}: the tokenizer has {len(tok)} tokens but the embedding has {vocab} rows"
        )


def verify_files(path: Path) -> CheckpointSummary:
    """The static checks on a directory (roots not included: `check_roots`)."""
    tensors = read_weights(path)
    config, raw = _load_config(path)
    dtype = check_architecture(config, raw, tensors, path)
    check_tokenizer(path, config)
    archs = raw.get("architectures") or [type(config).__name__]
    return CheckpointSummary(
        path=path,
        architecture=str(archs[0]),
        tensors=len(tensors),
        parameters=sum(math.prod(t.shape) for t in tensors.values()),
        dtype=dtype,
        verified="static",
    )


def _verify_files_in_child(path: Path) -> CheckpointSummary:
    cmd = [sys.executable, "-m", "instructloop.registry.verify", "--static-json", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=STATIC_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise CheckpointRejected(f"{path}: the static checks took over {STATIC_TIMEOUT_S} s") from e
    marks = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_MARK)]
    if not marks:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = tail[-1].strip() if tail else f"exit status {proc.returncode}"
        raise CheckpointRejected(f"{path}: the checks could not run ({reason[:300]})")
    result = json.loads(marks[-1].split(":", 1)[1])
    if "rejected" in result:
        raise CheckpointRejected(result["rejected"])
    return CheckpointSummary(**{**result, "path": Path(result["path"])})


# --- load --------------------------------------------------------------------------------------


def verify_load(path: Path, timeout_s: float = LOAD_TIMEOUT_S) -> None:
    """Start a vLLM engine on `path` in a child process and generate LOAD_MAX_TOKENS tokens
    greedily. A child: the engine's memory and processes go when it ends, a hang is bounded by
    `timeout_s`, and a crash in native code is a refusal rather than the caller's crash."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory; never reach for a hub
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # a few tokens need little KV cache
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "instructloop.registry.verify", "--load", str(path)]
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise CheckpointRejected(
            f"{path}: the engine did not load it and generate within {timeout_s:.0f} s"
        ) from e
    marks = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_MARK)]
    if proc.returncode == 0 and marks and marks[-1].split(":", 1)[1].strip().startswith("ok"):
        return
    if marks:
        reason = marks[-1].split(":", 1)[1].strip().removeprefix("failed").strip()
    else:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = tail[-1].strip() if tail else f"exit status {proc.returncode}"
    raise CheckpointRejected(f"{path}: the engine did not load it ({reason[:500]})")


def _load_and_generate(path: str) -> int:
    """The child's side of verify_load: the number of tokens generated."""
    from vllm import LLM, SamplingParams

    from instructloop.hardware import engine_dtype

    config = json.loads((Path(path) / "config.json").read_text())
    max_len = min(512, int(config.get("max_position_embeddings") or 512))
    llm = LLM(
        model=path,
        dtype=engine_dtype(path, "auto"),  # type: ignore[arg-type]
        max_model_len=max_len,
        enforce_eager=True,  # no graph capture: a faster start for a few tokens
        gpu_memory_utilization=0.2,  # beside a server that may share the GPU
        seed=0,
    )
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    params = SamplingParams(temperature=0.0, max_tokens=LOAD_MAX_TOKENS, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)
    n = len(out[0].outputs[0].token_ids)
    if n < 1:
        raise RuntimeError("the engine generated no token")
    return n


def _one_line(e: BaseException | object) -> str:
    """An exception's message on one line (some span several), bounded."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    return (text or type(e).__name__)[:300]


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m instructloop.registry.verify [--load] PATH`: verify one directory (roots
    included); the last stdout line says ok or why not. verify_load runs `--load` in a child."""
    ap = argparse.ArgumentParser(prog="python -m instructloop.registry.verify")
    ap.add_argument("path")
    ap.add_argument("--load", action="store_true", help="only the engine load (the child's part)")
    ap.add_argument(
        "--static-json", action="store_true", help="only the static checks, as JSON (a child's)"
    )
    args = ap.parse_args(argv)
    if args.static_json:
        try:
            out: dict[str, Any] = dataclasses.asdict(verify_files(Path(args.path)))
            out["path"] = str(out["path"])
        except CheckpointRejected as e:
            out = {"rejected": str(e)}
        print(f"{_RESULT_MARK} {json.dumps(out)}", flush=True)
        return 0
    if args.load:
        try:
            n = _load_and_generate(args.path)
        except Exception as e:
            print(f"{_RESULT_MARK} failed {type(e).__name__}: {_one_line(e)}", flush=True)
            return 1
        print(f"{_RESULT_MARK} ok, {n} tokens generated", flush=True)
        return 0
    try:
        print(verify_checkpoint(args.path).describe())
    except CheckpointRejected as e:
        print(f"rejected: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
