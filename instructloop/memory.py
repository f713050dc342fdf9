"""The memory plan of one machine that serves and trains: who gets how much.

On the CPU backend vLLM sizes its KV cache from `gpu_memory_utilization` of the machine's RAM
when VLLM_CPU_KVCACHE_SPACE is unset (90%): a serving engine started that way leaves a training
process beside it almost nothing, and the kernel's OOM killer then picks the largest process,
which is the serving engine. So every engine instructloop starts gets a KV cache from a budget:

- serving (`serve`, `up`): `serving_kv_cache_gib()`, a twelfth of RAM between 1 and 16 GiB,
  unless `--kv-cache-space-gib` or INSTRUCTLOOP_KV_CACHE_GIB says otherwise. The default model
  needs about 22.5 KB of cache per token (docs/VLLM-CPU.md), so even the 1 GiB floor holds over
  twenty full 2,048-token sequences at once: more than a few cores batch. The rest of
  the machine is the training stages' (their own engines have their own small caches).
- training steps: the cycle checks, before it starts a heavy step, that the memory the step needs
  is available now (`available_gib()`), and refuses the step with a clear message if it is not;
  the step runs at a lower CPU priority and is the OOM killer's first choice (the training
  loop's process supervision), so a step that still overruns dies instead of the server.
- one GPU for both (`up` on a CUDA machine): the serving engine takes
  `GPU_SERVING_SHARE_WITH_TRAINING` of the GPU's memory instead of vLLM's 0.9; PPO's rollout
  engine takes `PPOConfig.vllm_gpu_memory_utilization` (0.3), and the training tensors the rest.

Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from instructloop.errors import ConfigError

GiB = 1024**3
KV_CACHE_ENV = "INSTRUCTLOOP_KV_CACHE_GIB"
VLLM_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
"""vLLM's own variable: an operator who set it meant it (after ours)."""
SERVING_KV_FRACTION = 1 / 12
"""Share of RAM for the serving KV cache on the CPU backend (see the module docstring)."""
SERVING_KV_MIN_GIB, SERVING_KV_MAX_GIB = 1, 16
GPU_SERVING_SHARE_WITH_TRAINING = 0.5
"""gpu_memory_utilization of the serving engine when training shares its GPU (`up`): PPO's
rollout engine takes 0.3 and its actor, critic and reference the remaining 0.2."""


class MemoryPlanError(ConfigError):
    """A memory setting that cannot work (not a number, not positive, more than the machine)."""


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def total_gib() -> float:
    """RAM of this machine (or of its cgroup, where that is smaller)."""
    total = _meminfo().get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) / GiB if limit else total / GiB


def available_gib() -> float:
    """Memory a new process can take now without swapping or an OOM kill (MemAvailable)."""
    info = _meminfo()
    avail = info.get("MemAvailable", info.get("MemFree", 0))
    limit = _cgroup_limit()
    if limit:
        try:
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        except (OSError, ValueError):
            used = 0
        avail = min(avail, max(0, limit - used))
    return avail / GiB


def _cgroup_limit() -> int | None:
    """The cgroup v2 memory limit of this process, if it has one."""
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


def serving_kv_cache_gib(
    configured: float | None = None,
    environ: Mapping[str, str] | None = None,
    total: float | None = None,
) -> tuple[int, str]:
    """(KV cache GiB for the serving engine on the CPU backend, where the figure came from):
    `configured` (the flag), else INSTRUCTLOOP_KV_CACHE_GIB, else VLLM_CPU_KVCACHE_SPACE, else
    the plan's share of RAM."""
    env = os.environ if environ is None else environ
    ram = total_gib() if total is None else total
    if configured is not None:
        value: float = float(configured)
        source = "--kv-cache-space-gib"
    elif env.get(KV_CACHE_ENV) or env.get(VLLM_KV_CACHE_ENV):
        name = KV_CACHE_ENV if env.get(KV_CACHE_ENV) else VLLM_KV_CACHE_ENV
        raw = env[name]
        try:
            value = float(raw)
        except ValueError:
            raise MemoryPlanError(f"{name}={raw!r} is not a number of GiB") from None
        source = f"${name}"
    else:
        planned = round(ram * SERVING_KV_FRACTION)
        value = max(SERVING_KV_MIN_GIB, min(SERVING_KV_MAX_GIB, planned))
        return value, f"planned: 1/{round(1 / SERVING_KV_FRACTION)} of {ram:.1f} GiB RAM"
    if value != int(value):
        # vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer and would fail at engine start.
        raise MemoryPlanError(f"the serving KV cache is set in whole GiB, got {value:g} ({source})")
    if not value > 0:
        raise MemoryPlanError(f"the serving KV cache must be positive: {value:g} GiB ({source})")
    if value >= ram:
        raise MemoryPlanError(
            f"a {value:g} GiB serving KV cache ({source}) does not fit in {ram:.1f} GiB of RAM"
        )
    return int(value), source


@dataclass(frozen=True)
class MemoryPlan:
    """What `up` and `serve` tell the operator at start, and `status` shows."""

    total_gib: float
    serving_kv_cache_gib: int
    source: str

    @property
    def left_gib(self) -> float:
        """What the serving KV cache leaves for the model weights, training and the OS."""
        return self.total_gib - self.serving_kv_cache_gib

    def describe(self) -> str:
        return (
            f"memory: serving KV cache {self.serving_kv_cache_gib:g} GiB ({self.source}; "
            f"--kv-cache-space-gib or ${KV_CACHE_ENV} to change), {self.left_gib:.1f} of "
            f"{self.total_gib:.1f} GiB left for the weights, training and the system"
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "total_gib": round(self.total_gib, 2),
            "serving_kv_cache_gib": self.serving_kv_cache_gib,
        }


def plan_cpu_serving(
    configured: float | None, environ: Mapping[str, str] | None = None
) -> MemoryPlan:
    """The serving engine's share on the CPU backend (raises MemoryPlanError)."""
    total = total_gib()
    kv, source = serving_kv_cache_gib(configured, environ, total)
    return MemoryPlan(total, kv, source)
