"""Load a checkpoint or a state dict into a running engine, from the caller's process: pause,
load in the worker (worker.py), roll a load that failed half way back to the checkpoint served
before, reset the prefix cache, resume. Serving's AsyncLLM and training's offline vllm.LLM each
have their calls; loads into one engine never interleave."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructloop.weight_sync.checkpoint import (
    check_specs,
    expected_for,
    model_config,
    validate_checkpoint,
)
from instructloop.weight_sync.config import WORKER_EXTENSION, WeightSyncConfig, WeightSyncError
from instructloop.weight_sync.staging import staged, staging_root
from instructloop.weight_sync.worker import RPC_CHECK_HEAD, RPC_LOAD

if TYPE_CHECKING:
    import torch
    import vllm
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


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


# Per engine: the checkpoint it serves now (for rollback; None after a load from memory), and a
# lock so that two swaps never interleave.
_served: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
_async_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()
_sync_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def served_checkpoint(llm: Any) -> str | None:
    """The checkpoint directory the engine's weights came from (its start-up model until a load
    through this module; None after `load_state_dict_sync` staged through a deleted directory)."""
    return _served[llm] if llm in _served else str(model_config(llm).model)


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
        t0 = time.perf_counter()
        await llm.pause_generation(mode=drain, clear_cache=True)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        await _load_paused(llm, path, cfg)
        times = LoadTimes(drain_s=t1 - t0, load_s=time.perf_counter() - t1)
    log.info("loaded %s into the running engine (%s)", path, times)
    return times


async def _load_paused(llm: AsyncLLM, path: str, cfg: WeightSyncConfig) -> None:
    """Load `path` into a paused AsyncLLM, reset its prefix cache and resume it. A load that
    fails half way is rolled back to the checkpoint served before; an engine whose weights are
    then unknown stays paused (WeightSyncError.engine_consistent False)."""
    previous = served_checkpoint(llm)
    consistent = True
    try:
        try:
            await llm.collective_rpc(RPC_LOAD, kwargs=_rpc_kwargs(path, cfg))
            _served[llm] = path
        except Exception as e:
            consistent = False
            if cfg.rollback and previous is not None:
                try:
                    await llm.collective_rpc(RPC_LOAD, kwargs=_rpc_kwargs(previous, cfg))
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
    expected = expected_for(model_config(llm).hf_config)
    check_specs(
        expected,
        {n: (tuple(t.shape), _st_dtype(t)) for n, t in state_dict.items()},
        "state dict",
    )
    for dup, canon in expected.tied.items():
        if dup in state_dict and not torch.equal(state_dict[dup], state_dict[canon]):
            raise WeightSyncError(f"state dict: {dup} differs from {canon}, which it is tied to")
    # The engine loads tied weights through the name they alias.
    tensors = {n: t for n, t in state_dict.items() if n not in expected.tied}

    if worker_in_process(llm):
        return _load_sync(llm, None, cfg, tensors=tensors)

    with staged(tensors, staging_root(cfg.staging_dir)) as tmp:
        times = _load_sync(llm, str(tmp), cfg)
    _served[llm] = None  # the staged files are gone: nothing to roll back to
    return times


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
                llm.collective_rpc(RPC_LOAD, kwargs=kwargs)
            else:
                assert path is not None
                llm.collective_rpc(RPC_LOAD, kwargs=_rpc_kwargs(path, cfg))
            _served[llm] = path
        except Exception as e:
            consistent = False
            if cfg.rollback and previous is not None:
                try:
                    llm.collective_rpc(RPC_LOAD, kwargs=_rpc_kwargs(previous, cfg))
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
    return llm.collective_rpc(RPC_CHECK_HEAD)


async def check_head(llm: AsyncLLM) -> list[float]:
    """`check_head_sync` for AsyncLLM."""
    return await llm.collective_rpc(RPC_CHECK_HEAD)


def worker_in_process(llm: Any) -> bool:
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
