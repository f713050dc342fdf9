"""What this machine computes well: the CPU's bf16 support, and the dtype a vLLM engine should
run a checkpoint in. Shared by the server (serving/engine.py) and training's offline engines."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
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
    a CPU without native bf16, which runs in float32 because vLLM's bf16 path, emulated there,
    is several times slower (benchmarks/HISTORY.md, "Measurements behind defaults"). A hub id
    (no local config) keeps vLLM's "auto" where bf16 is native."""
    if dtype != "auto":
        return dtype
    local = (Path(model_path) / "config.json").is_file()
    name = model_dtype_name(model_path) if local else "auto"
    if name in ("bfloat16", "float16", "auto") and not cpu_native_bf16():
        import torch

        if not torch.cuda.is_available():
            return "float32"
    return name


# vLLM's CPU backend holds cores back from the model for its scheduler process, which
# busy-waits on the model's worker (one core per rank; VLLM_CPU_NUM_OF_RESERVED_CPU). On a machine
# with this many usable cores or fewer that leaves the model half the machine or less, and giving
# it every core is faster under load even though the scheduler then shares one with it
# (benchmarks/HISTORY.md, `serving`). Above the threshold vLLM's choice stands: it is unmeasured.
SMALL_MACHINE_CORES = 2
RESERVED_CORES_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"

# GNU OpenMP (torch's CPU threads on Linux) keeps a thread that finished its share of a parallel
# region spinning for up to GOMP_SPINCOUNT turns (300,000 by default) before it sleeps. Where the
# model's threads share their cores with vLLM's scheduler and the API process (no core reserved),
# that spinning takes the cores from them between the many small parallel regions of a decode
# step. A short spin beat both the default and OMP_WAIT_POLICY=PASSIVE (sleep at once) at low and
# high concurrency (benchmarks/HISTORY.md, `serving` with a short OpenMP spin).
OMP_SPIN_ENV = "GOMP_SPINCOUNT"
SHARED_CORES_OMP_SPINCOUNT = 20_000
_OMP_WAIT_ENVS = (OMP_SPIN_ENV, "OMP_WAIT_POLICY")


def usable_cores() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_cpu_list(spec: str) -> frozenset[int] | None:
    """The cores a VLLM_CPU_OMP_THREADS_BIND value names ("0-3", "1,5", "0-3|4-7" for several
    ranks); None for the words that leave the choice to vLLM ("auto", "all", "nobind") or for
    what is not a core list."""
    cores: set[int] = set()
    for part in re.split(r"[|,]", spec.strip()):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            return None
        cores.update(range(int(lo), int(hi if dash else lo) + 1))
    return frozenset(cores) or None


def engine_cores(bind: str | None) -> frozenset[int]:
    """The cores a CPU engine computes on: those its OpenMP binding names, else (vLLM's own
    choice, made inside this process's affinity) every core this process may use."""
    named = parse_cpu_list(bind) if bind else None
    if named is not None:
        return named
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def engine_reserved_cores(
    configured: int | None, environ: Mapping[str, str] = os.environ, cores: int | None = None
) -> int | None:
    """How many cores a CPU engine keeps for its scheduler: `configured` if set, else what the
    operator put in VLLM_CPU_NUM_OF_RESERVED_CPU (None: leave it), else 0 on a machine of at
    most SMALL_MACHINE_CORES usable cores, else None (vLLM's default)."""
    if configured is not None:
        return configured
    if RESERVED_CORES_ENV in environ:
        return None
    n = usable_cores() if cores is None else cores
    return 0 if n <= SMALL_MACHINE_CORES else None


def cpu_engine_installed() -> bool:
    """Whether the installed vLLM is the CPU build (vllm-cpu): no torch import needed. One
    distribution is looked up by name, since scanning every installed one slows start-up."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def engine_omp_env(
    configured: int | None, environ: Mapping[str, str] = os.environ, cores: int | None = None
) -> dict[str, str]:
    """OpenMP settings for a CPU engine whose model shares its cores (no core reserved, by our
    rule or the operator's VLLM_CPU_NUM_OF_RESERVED_CPU=0): a short spin before an idle thread
    sleeps. Nothing where the operator set OpenMP's spin count or wait policy. libgomp reads
    them once, when torch is first imported, and vLLM forks the engine's processes from the one
    that starts it: set them before that process imports torch."""
    if any(k in environ for k in _OMP_WAIT_ENVS):
        return {}
    reserved = engine_reserved_cores(configured, environ, cores)
    if reserved is None:
        try:
            reserved = int(environ.get(RESERVED_CORES_ENV, ""))
        except ValueError:
            return {}
    return {OMP_SPIN_ENV: str(SHARED_CORES_OMP_SPINCOUNT)} if reserved == 0 else {}
