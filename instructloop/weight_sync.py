"""Load new weights into a RUNNING vLLM engine, correctly.

Used by serving's hot swap (`reload_weights`, AsyncLLM) and by PPO rollouts
(`reload_weights_sync` / `load_state_dict_sync`, offline `vllm.LLM`).

Why not just `collective_rpc("reload_weights", ...)`: vLLM's in-place reload
(`vllm/model_executor/model_loader/reload/`) loads each layer into fresh tensors, re-runs that
layer's `process_weights_after_loading` and copies the result into the old storage. A layer that
receives no tensor from the checkpoint is skipped ("ParallelLMHead: Failed to load weights") and
keeps whatever its post-processing derived from the OLD weights. With tied embeddings (SmolLM2,
Llama-3.2 1B/3B, small Qwen2.5) `lm_head` shares `embed_tokens.weight` and is never in the
checkpoint: its storage receives the new values through `embed_tokens`, but on the CPU backend its
GEMM kernel (`lm_head.cpu_linear`: a oneDNN handle made by `dispatch_cpu_unquantized_gemm`, which
holds a reordered COPY of the weight) still multiplies by the old embedding. Logits then come from
the old head on top of the new network, and greedy tokens match neither transformers nor a fresh
engine. Whether oneDNN takes that path depends on the CPU and dtype (bf16 needs AVX512-BF16 or
AMX; fp32 works on any x86 with oneDNN); where it does not, vLLM falls back to `F.linear` on the
live weight and the plain reload happens to be right.

The method here: vLLM's own layer-wise reload (which re-packs every loaded layer correctly), then
re-run `process_weights_after_loading` on every module whose parameter is shared with another
module (the tied head), then check that the head's kernel computes `x @ W.T` for the weight it
holds. On CUDA the head's post-processing is a no-op and its kernel reads the live weight, so the
same code is right on the GPU `vllm` package too (same v1 reload path; not run on a GPU here).

The worker-side code runs inside vLLM's worker process as a *worker extension*: the engine must be
started with `worker_extension_cls=WORKER_EXTENSION` (see `engine_kwargs()`). Calls go by method
name through `collective_rpc`, so no functions are pickled (VLLM_ALLOW_INSECURE_SERIALIZATION off).

A checkpoint is validated (config, tensor names, shapes, dtypes, file sizes) against the running
engine before the engine is paused, so a bad checkpoint changes nothing. If loading still fails
half way (an I/O error, a file replaced under us), the checkpoint served before is loaded back
before generation resumes.

No torch or transformers import at module level: serving imports this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import vllm
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

WORKER_EXTENSION = "instructloop.weight_sync.WeightSyncWorkerExtension"
"""Pass as `worker_extension_cls` when creating an engine whose weights will be updated."""

_RPC_LOAD = "instructloop_load_weights"
_RPC_CHECK_HEAD = "instructloop_check_head"

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


class WeightSyncError(RuntimeError):
    """Loading weights failed.

    `engine_consistent` is True when the engine serves the weights it served before the call (the
    checkpoint was rejected before anything changed, or the old weights were loaded back) and has
    been resumed. When False the engine's weights are unknown; it is left paused and must be
    restarted.
    """

    def __init__(self, message: str, *, engine_consistent: bool = True) -> None:
        super().__init__(message)
        self.engine_consistent = engine_consistent


@dataclass(frozen=True)
class WeightSyncConfig:
    """Options for loading weights into a running engine (defaults are what serving and PPO use).

    check_head: after loading, compare the logits head's kernel with `x @ W.T` on random inputs in
        the worker (a stale prepacked head is the known failure of in-place reloads); costs one
        small matmul.
    rollback: when loading fails half way, load the previously served checkpoint back.
    staging_dir: where `load_state_dict_sync` writes tensors for an engine whose worker is another
        process. None: /dev/shm when present (RAM, no disk I/O), else the system temp directory.
    """

    check_head: bool = True
    rollback: bool = True
    staging_dir: Path | None = field(default=None)


@dataclass(frozen=True)
class LoadTimes:
    """How long a load took. `drain_s`: pausing (waiting for or aborting in-flight requests;
    0 for the offline engine); `load_s`: loading in the worker and resetting the prefix cache."""

    drain_s: float
    load_s: float

    @property
    def paused_s(self) -> float:
        """Seconds no new token was generated for newly arriving requests."""
        return self.drain_s + self.load_s


def engine_kwargs() -> dict[str, str]:
    """Add these to `AsyncEngineArgs(...)` / `vllm.LLM(...)` for an engine this module updates."""
    return {"worker_extension_cls": WORKER_EXTENSION}


# --------------------------------------------------------------------------------------------
# Checkpoint validation (client side, before anything is paused)
# --------------------------------------------------------------------------------------------


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
class _Expected:
    required: dict[str, tuple[int, ...]]  # name -> shape
    tied: dict[str, str]  # duplicate name -> the required name it aliases (lm_head -> embed)


@lru_cache(maxsize=8)
def _expected_tensors(config_json: str) -> _Expected:
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
    return _Expected(required, tied)


def _expected_for(running_cfg: Any) -> _Expected:
    try:
        return _expected_tensors(json.dumps(running_cfg.to_dict(), sort_keys=True, default=str))
    except Exception as e:  # e.g. an architecture transformers cannot build without remote code
        raise WeightSyncError(
            f"cannot build the reference tensor list for the running architecture ({e})"
        ) from e


def _inference_config(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in _CONFIG_KEYS_IGNORED and "dropout" not in k}


def _model_config(llm: Any) -> Any:
    # AsyncLLM has model_config; the offline vllm.LLM keeps it on its LLMEngine.
    mc = getattr(llm, "model_config", None)
    return mc if mc is not None else llm.llm_engine.model_config


def _vllm_config(llm: Any) -> Any:
    vc = getattr(llm, "vllm_config", None)
    return vc if vc is not None else llm.llm_engine.vllm_config


def _check_extension(llm: Any) -> None:
    ext = _vllm_config(llm).parallel_config.worker_extension_cls
    if ext != WORKER_EXTENSION:
        raise WeightSyncError(
            f"the engine was started without instructloop's worker extension "
            f"(worker_extension_cls={ext!r}); create it with "
            f"worker_extension_cls={WORKER_EXTENSION!r}, see weight_sync.engine_kwargs()"
        )


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
    running_cfg = _model_config(llm).hf_config
    a, b = _inference_config(running_cfg), _inference_config(new_cfg)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        details = ", ".join(f"{k}: engine {a.get(k)!r}, checkpoint {b.get(k)!r}" for k in diff)
        raise WeightSyncError(f"{ckpt}: config differs from the running engine's ({details})")

    specs = read_safetensors_index(ckpt)
    expected = _expected_for(running_cfg)
    _check_specs(expected, {n: (s.shape, s.dtype) for n, s in specs.items()}, str(ckpt))
    stored_dups = [n for n in expected.tied if n in specs]
    if stored_dups:
        _check_tied_equal_on_disk(specs, expected, stored_dups, ckpt)
    return specs


def warm_validation(llm: Any) -> None:
    """Build (and cache) the running architecture's reference tensor list now, so the first
    `validate_checkpoint` does not pay for it (about 1 s: transformers' model classes on the meta
    device). A server that follows the registry calls it at start, off the event loop."""
    _expected_for(_model_config(llm).hf_config)


def _check_specs(
    expected: _Expected, specs: Mapping[str, tuple[tuple[int, ...], str]], where: str
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
    specs: Mapping[str, TensorSpec], expected: _Expected, names: list[str], ckpt: Path
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

# Per engine: the checkpoint it serves now (for rollback; None after a load from memory), and a
# lock so that two swaps never interleave.
_served: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
_async_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()
_sync_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def served_checkpoint(llm: Any) -> str | None:
    """The checkpoint directory the engine's weights came from (its start-up model until a load
    through this module; None after `load_state_dict_sync` staged through a deleted directory)."""
    return _served[llm] if llm in _served else str(_model_config(llm).model)


def _rpc_kwargs(path: str, cfg: WeightSyncConfig) -> dict[str, Any]:
    return {"weights_path": path, "check_head": cfg.check_head}


def _failure(what: str, err: Exception, consistent: bool) -> WeightSyncError:
    tail = "previous weights restored" if consistent else "engine weights unknown; restart it"
    return WeightSyncError(f"loading {what} failed: {err}; {tail}", engine_consistent=consistent)


async def reload_weights(
    llm: AsyncLLM,
    checkpoint_dir: str | Path,
    *,
    drain: str = "wait",
    config: WeightSyncConfig | None = None,
    validate: bool = True,
) -> LoadTimes:
    """Swap a running AsyncLLM's weights for those in `checkpoint_dir` (a Hugging Face safetensors
    directory of the same architecture).

    Validate (nothing paused yet) -> pause (drain "wait": in-flight requests finish on the old
    weights; "abort": they end now with finish_reason "abort" and may be resubmitted) -> load in
    the worker and re-derive tied/prepacked state -> reset the prefix cache -> resume. Requests
    arriving meanwhile queue in the engine and run on the new weights. vLLM's pause mode "keep" is
    refused: kept requests would continue on the new weights over a KV cache from the old ones.
    Raises WeightSyncError; see its `engine_consistent`. `validate=False` skips the checks for
    a caller that has just run `validate_checkpoint` itself (serving's hot swap does, before it
    drains).
    """
    cfg = config or WeightSyncConfig()
    if drain not in ("wait", "abort"):
        raise WeightSyncError(f"drain must be 'wait' or 'abort', not {drain!r}")
    _check_extension(llm)
    path = str(Path(checkpoint_dir).resolve())
    # Reading headers and building the reference model takes a while; keep the event loop free.
    if validate:
        await asyncio.to_thread(validate_checkpoint, llm, path)

    with _locks_guard:
        lock = _async_locks.setdefault(llm, asyncio.Lock())
    async with lock:
        previous = served_checkpoint(llm)
        t0 = time.perf_counter()
        await llm.pause_generation(mode=drain, clear_cache=True)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        consistent = True
        try:
            try:
                await llm.collective_rpc(_RPC_LOAD, kwargs=_rpc_kwargs(path, cfg))
                _served[llm] = path
            except Exception as e:
                consistent = False
                if cfg.rollback and previous is not None:
                    try:
                        await llm.collective_rpc(_RPC_LOAD, kwargs=_rpc_kwargs(previous, cfg))
                        consistent = True
                        _served[llm] = previous
                    except Exception:
                        log.exception("rollback to %s failed", previous)
                raise _failure(path, e, consistent) from e
            finally:
                if consistent:
                    # Cached prefixes hold K/V computed by the old weights.
                    await llm.reset_prefix_cache()
        finally:
            if consistent:
                await llm.resume_generation()
        times = LoadTimes(drain_s=t1 - t0, load_s=time.perf_counter() - t1)
    log.info("loaded %s into the running engine (%s)", path, times)
    return times


def reload_weights_sync(
    llm: vllm.LLM, checkpoint_dir: str | Path, *, config: WeightSyncConfig | None = None
) -> LoadTimes:
    """`reload_weights` for the offline `vllm.LLM` (PPO rollouts). Call it between `generate`
    calls (nothing is in flight then); not thread-safe against a concurrent `generate`."""
    cfg = config or WeightSyncConfig()
    _check_extension(llm)
    path = str(Path(checkpoint_dir).resolve())
    validate_checkpoint(llm, path)
    return _load_sync(llm, path, cfg)


def load_state_dict_sync(
    llm: vllm.LLM,
    state_dict: Mapping[str, torch.Tensor],
    *,
    config: WeightSyncConfig | None = None,
) -> LoadTimes:
    """Load a Hugging Face-named state dict (e.g. `policy.state_dict()` of a transformers model of
    the engine's architecture; merge LoRA adapters first) into the offline `vllm.LLM`, without a
    checkpoint on disk.

    When the worker runs in this process (engine made with VLLM_ENABLE_V1_MULTIPROCESSING=0 and
    distributed_executor_backend="uni") the tensors reach it by reference. Otherwise they must
    cross a process boundary: they are written once as safetensors into `staging_dir`
    (RAM-backed /dev/shm by default), loaded from there and deleted.
    """
    import torch

    cfg = config or WeightSyncConfig()
    _check_extension(llm)
    expected = _expected_for(_model_config(llm).hf_config)
    _check_specs(
        expected,
        {n: (tuple(t.shape), _st_dtype(t)) for n, t in state_dict.items()},
        "state dict",
    )
    for dup, canon in expected.tied.items():
        if dup in state_dict and not torch.equal(state_dict[dup], state_dict[canon]):
            raise WeightSyncError(f"state dict: {dup} differs from {canon}, which it is tied to")
    # The engine loads tied weights through the name they alias.
    tensors = {n: t for n, t in state_dict.items() if n not in expected.tied}

    if _worker_in_process(llm):
        return _load_sync(llm, None, cfg, tensors=tensors)

    from safetensors.torch import save_file

    staging = cfg.staging_dir
    if staging is None and Path("/dev/shm").is_dir():
        staging = Path("/dev/shm")
    staging = Path(staging) if staging is not None else Path(tempfile.gettempdir())
    _remove_orphaned_staging(staging)
    # The pid in the name lets a later call tell a killed process's leftovers from live staging.
    tmp = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=staging))
    try:
        cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        save_file(cpu, str(tmp / "model.safetensors"))
        del cpu
        times = _load_sync(llm, str(tmp), cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _served[llm] = None  # the staged files are gone: nothing to roll back to
    return times


_STAGING_PREFIX = "instructloop-weights-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_orphaned_staging(staging: Path) -> None:
    """Delete staging left by processes that died mid-load (SIGKILL skips `finally`): in
    RAM-backed /dev/shm each would hold a whole model's weights until reboot."""
    for d in staging.glob(f"{_STAGING_PREFIX}*"):
        pid = d.name[len(_STAGING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.info("removing staging %s left by dead process %s", d, pid)
            shutil.rmtree(d, ignore_errors=True)


def _load_sync(
    llm: Any,
    path: str | None,
    cfg: WeightSyncConfig,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> LoadTimes:
    with _locks_guard:
        lock = _sync_locks.setdefault(llm, threading.Lock())
    with lock:
        previous = served_checkpoint(llm)
        t0 = time.perf_counter()
        try:
            if tensors is not None:
                kwargs = {"tensors": list(tensors.items()), "check_head": cfg.check_head}
                llm.collective_rpc(_RPC_LOAD, kwargs=kwargs)
            else:
                assert path is not None
                llm.collective_rpc(_RPC_LOAD, kwargs=_rpc_kwargs(path, cfg))
            _served[llm] = path
        except Exception as e:
            consistent = False
            if cfg.rollback and previous is not None:
                try:
                    llm.collective_rpc(_RPC_LOAD, kwargs=_rpc_kwargs(previous, cfg))
                    consistent = True
                    _served[llm] = previous
                except Exception:
                    log.exception("rollback to %s failed", previous)
            raise _failure(path or "state dict", e, consistent) from e
        finally:
            llm.reset_prefix_cache()
        return LoadTimes(drain_s=0.0, load_s=time.perf_counter() - t0)


def check_head_sync(llm: vllm.LLM) -> list[float]:
    """Per worker: max |kernel(x) - x @ W.T| / max |x @ W.T| of the logits head on random x.
    Near 0 when the head's kernel matches its weight (a bf16 kernel gives ~1e-2)."""
    return llm.collective_rpc(_RPC_CHECK_HEAD)


async def check_head(llm: AsyncLLM) -> list[float]:
    """`check_head_sync` for AsyncLLM."""
    return await llm.collective_rpc(_RPC_CHECK_HEAD)


def _worker_in_process(llm: Any) -> bool:
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    client = getattr(llm.llm_engine, "engine_core", None)
    if not isinstance(client, InprocClient):
        return False
    return isinstance(client.engine_core.model_executor, UniProcExecutor)


def _st_dtype(t: torch.Tensor) -> str:
    import torch

    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
    return names.get(t.dtype, "F64" if t.dtype == torch.float64 else str(t.dtype))


# --------------------------------------------------------------------------------------------
# Worker side: runs inside vLLM's worker process
# --------------------------------------------------------------------------------------------

_HEAD_TOLERANCE = 0.05  # relative; bf16 kernels differ from an fp32 reference by ~1e-2


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its methods run in the worker,
    where `self.model_runner` and `self.reload_weights` are vLLM's. Method names carry a prefix so
    they cannot clash with vLLM's own worker attributes."""

    def instructloop_load_weights(
        self,
        weights_path: str | None = None,
        tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
        check_head: bool = True,
    ) -> dict[str, Any]:
        import torch

        t0 = time.perf_counter()
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with torch.no_grad():
            try:
                if tensors is not None:
                    weights = ((n, t.detach()) for n, t in tensors)
                    self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
                else:
                    self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
            except BaseException:
                _abandon_partial_reload(model)
                raise
            reprocessed = _reprocess_shared_modules(model)
            if check_head:
                err = _head_error(model)
                if err > _HEAD_TOLERANCE:
                    raise RuntimeError(
                        f"lm_head kernel disagrees with its weight after loading (relative "
                        f"error {err:.3g})"
                    )
        return {"seconds": time.perf_counter() - t0, "reprocessed": reprocessed}

    def instructloop_check_head(self) -> float:
        import torch

        with torch.no_grad():
            return _head_error(self.model_runner.get_model())  # type: ignore[attr-defined]


def _abandon_partial_reload(model: torch.nn.Module) -> None:
    """Undo the bookkeeping of a layer-wise reload that raised half way, so that the next reload
    (the rollback) starts clean.

    vLLM leaves layers it had not reached on the meta device with wrapped loaders, and the failing
    layer with the bad tensor buffered; a second reload would skip re-initialising them and replay
    the bad tensor. Putting every pending layer's original (kernel) tensors back leaves a model
    whose layers hold either their old or their new weights, each consistently processed, which
    a full reload then overwrites. Uses vLLM internals (reload/layerwise.py in vllm 0.32); if they
    change, this raises and the rollback reports the engine as inconsistent.
    """
    from vllm.model_executor.model_loader.reload import layerwise

    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    for layer in model.modules():
        info = layerwise.LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load():
            continue
        if info.kernel_tensors is not None:
            layerwise._place_kernel_tensors(layer, info)
        info.reset()
    layerwise.LOADING_LAYERS.clear()


def _reprocess_shared_modules(model: torch.nn.Module) -> list[str]:
    """Re-run weight post-processing on modules that share a parameter with another module.

    vLLM's in-place reload skips a module that got no checkpoint tensor; a tied lm_head gets its
    new values only through the shared storage, so whatever its post-processing derived from the
    weight (the CPU backend's prepacked GEMM weight) is stale until re-derived here.
    """
    owners: dict[int, list[str]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for mod_name, mod in modules.items():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod_name)
    shared = sorted({m for names in owners.values() if len(names) > 1 for m in names})
    done = []
    for mod_name in shared:
        mod = modules[mod_name]
        process = getattr(getattr(mod, "quant_method", None), "process_weights_after_loading", None)
        if process is None:
            continue
        weight = getattr(mod, "weight", None)
        if weight is not None and weight.numel() == 0:
            # Post-processing consumed the weight (a repacked linear): nothing left to re-derive
            # from. No tied module does this in vLLM today; fail loudly if one starts to.
            raise RuntimeError(f"{mod_name}: its shared weight was consumed by post-processing")
        process(mod)
        done.append(mod_name)
    return done


def _head_error(model: torch.nn.Module) -> float:
    """Relative max error of the logits head's kernel against x @ W.T (0.0 if not checkable)."""
    import torch

    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    quant_method = getattr(head, "quant_method", None)
    if weight is None or quant_method is None or weight.numel() == 0 or weight.ndim != 2:
        return 0.0
    if type(quant_method).__name__ not in ("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod"):
        return 0.0  # a quantized head has no plain weight to compare with
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    got = quant_method.apply(head, x).float()
    want = torch.nn.functional.linear(x.float(), weight.float())
    return (got - want).abs().max().item() / (want.abs().max().item() + 1e-6)


__all__ = [
    "WORKER_EXTENSION",
    "LoadTimes",
    "TensorSpec",
    "WeightSyncConfig",
    "WeightSyncError",
    "WeightSyncWorkerExtension",
    "check_head",
    "check_head_sync",
    "engine_kwargs",
    "load_state_dict_sync",
    "read_safetensors_index",
    "reload_weights",
    "reload_weights_sync",
    "served_checkpoint",
    "validate_checkpoint",
    "warm_validation",
]
