"""How the serving engine is built: vLLM's engine arguments, the environment its core process
starts in, the stat logger that feeds the metrics, and sampling parameters.

Every vLLM import here sits inside a function, so importing this module stays cheap (the CLI and
the config do not pay for vLLM). The CPU backend's traps these settings avoid are in
docs/VLLM-CPU.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from instructloop import weight_sync
from instructloop.hardware import RESERVED_CORES_ENV, engine_dtype, engine_reserved_cores
from instructloop.memory import plan_cpu_serving
from instructloop.serving.config import ServerConfig
from instructloop.serving.engine_types import EngineStats, GenerationParams


def is_cpu_backend() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_args(model: str, cfg: ServerConfig) -> Any:
    """vLLM's AsyncEngineArgs for serving `model` with `cfg`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    cpu = is_cpu_backend()
    enforce_eager = cfg.enforce_eager if cfg.enforce_eager is not None else cpu
    chunked = cfg.enable_chunked_prefill
    if chunked is None and cpu:
        chunked = False  # the seed trap: docs/VLLM-CPU.md, "Seeds and chunked prefill"
    kwargs: dict[str, Any] = {
        "model": model,
        "dtype": engine_dtype(model, cfg.dtype),
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enforce_eager": enforce_eager,
        "enable_chunked_prefill": chunked,
        "disable_log_stats": False,  # our stat logger needs the scheduler stats
        "enable_log_requests": False,
        # Lets hot swap load new weights into this engine (instructloop/weight_sync/).
        **weight_sync.engine_kwargs(),
    }
    if cfg.max_num_seqs is not None:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if cfg.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    return AsyncEngineArgs(**kwargs)


@dataclass
class StartEnv:
    """The environment the engine core process reads at start, and what it was given."""

    env: dict[str, str] = field(default_factory=dict)
    memory_plan: dict[str, float] = field(default_factory=dict)
    """GiB of KV cache on the CPU, a GPU share on CUDA."""


def start_env(cfg: ServerConfig, progress: Callable[[str], None]) -> StartEnv:
    """Variables for the engine core process: its OpenMP cores, its KV cache from the memory plan
    (never vLLM's own 90% of RAM on the CPU, so training beside the server has room:
    instructloop/memory.py) and the cores held back for vLLM's scheduler."""
    out = StartEnv()
    if cfg.cpu_omp_threads_bind is not None:
        out.env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_omp_threads_bind
    cpu = is_cpu_backend()
    if cpu:
        plan = plan_cpu_serving(cfg.cpu_kvcache_space_gib)
        out.env["VLLM_CPU_KVCACHE_SPACE"] = str(plan.serving_kv_cache_gib)
        out.memory_plan = plan.to_dict()
        progress(plan.describe())
    else:
        out.memory_plan = {"gpu_memory_utilization": cfg.gpu_memory_utilization}
    reserved = engine_reserved_cores(cfg.cpu_reserved_cores)
    if reserved is not None and cpu:
        out.env[RESERVED_CORES_ENV] = str(reserved)
        if reserved == 0:
            # vLLM warns that 0 is below its minimum; say why it is set.
            progress(
                "engine: no core held back for vLLM's scheduler, the model gets every core "
                "(more throughput on a small machine; --cpu-reserved-cores 1 keeps vLLM's choice)"
            )
    return out


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set inside the block, the old values back after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stat_logger_factory(stats: EngineStats) -> Any:
    """A vLLM StatLoggerBase subclass that writes scheduler stats into `stats`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            stats.steps += 1
            stats.num_running_reqs = scheduler_stats.num_running_reqs
            stats.num_waiting_reqs = scheduler_stats.num_waiting_reqs
            stats.kv_cache_usage = scheduler_stats.kv_cache_usage
            stats.last_step_at = time.monotonic()

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


def build_llm(model: str, cfg: ServerConfig, stats: EngineStats) -> Any:
    """Start vLLM's AsyncLLM (blocking: its core process loads the model)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(
        engine_args(model, cfg), stat_loggers=[stat_logger_factory(stats)]
    )


def sampling_params(p: GenerationParams) -> Any:
    """vLLM's SamplingParams for `p`, streaming deltas. Raises ValueError on vLLM's own checks."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=p.n,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        seed=p.seed,
        stop=list(p.stop) or None,
        output_kind=RequestOutputKind.DELTA,
    )
