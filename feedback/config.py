"""Settings of the feedback store (one dataclass, as TRL configures each stage)."""

from __future__ import annotations

from dataclasses import dataclass

from instructloop.feedback.keys import DEFAULT_KEY_PREFIX


@dataclass
class StoreConfig:
    """How completions and feedback are kept in Redis.

    Retention: completion records (and their response index entries) and feedback records can
    expire; the log streams can be trimmed. Feedback whose completion has expired can no longer
    be exported (the export skips and counts it), so keep `completion_ttl_s` at least as long as
    the feedback you want to train on.
    """

    key_prefix: str = DEFAULT_KEY_PREFIX
    """Every key starts with this (docs/REDIS-KEYS.md)."""

    completion_ttl_s: int | None = None
    """Retention of a completion record and its response-id index entries, in seconds.
    None keeps them forever. Feedback on an expired response is refused (NOT_FOUND)."""

    feedback_ttl_s: int | None = None
    """Retention of a feedback record and its idempotency entry, in seconds. None keeps forever.
    An idempotency key can be reused for a new judgement only after it expires."""

    stream_maxlen: int | None = None
    """Approximate cap (XADD MAXLEN ~) on the length of each log stream (completions, feedback).
    None never trims. Trimmed feedback entries are no longer exported."""

    rate_limit_per_minute: int = 600
    """Stored feedback submissions per user (within its principal) per window (fixed window in
    Redis, so the limit holds across server replicas). 0 disables the limit. Only feedback that
    is actually stored counts: invalid requests, idempotent replays and refused requests do
    not."""

    principal_rate_limit_per_minute: int = 0
    """Stored feedback submissions per principal (an API key's owner, all its users together)
    per window; 0 disables. Off by default: one application key usually carries all of a
    product's users, and only the operator knows their volume (`--quota-feedback`)."""

    rate_limit_window_s: int = 60
    """Length of the rate-limit window in seconds (the limit is per this window)."""

    max_metadata_entries: int = 32
    """Most entries in a completion's metadata map (completion.proto says 32)."""

    max_metadata_key_chars: int = 128
    """Longest metadata key."""

    max_metadata_value_chars: int = 1024
    """Longest metadata value."""

    max_id_chars: int = 256
    """Longest user_id, idempotency_key, completion or response id accepted (keeps keys small)."""

    max_ranking_size: int = 16
    """Most responses in one ranking: a completion has at most 16 (its `n`); InstructGPT ranked
    K = 4 to 9 (§3.5)."""

    socket_timeout_s: float = 5.0
    """Seconds to wait for a Redis reply before the write counts as failed (UNAVAILABLE)."""

    socket_connect_timeout_s: float = 2.0
    """Seconds to wait for a TCP connection to Redis."""

    max_connections: int = 256
    """Size of the connection pool; callers beyond it wait for a free connection."""

    retries: int = 2
    """Reconnect-and-retry attempts after a connection error, before StoreUnavailable. Retries
    are safe: a retried write carries the same feedback id and is recognised, never doubled."""

    retry_backoff_cap_s: float = 0.1
    """Upper bound of the (exponential) pause between retries."""

    write_batch_max: int = 128
    """Most script calls sent together in one batch (concurrent writes are batched)."""

    write_batches_in_flight: int = 1
    """Batches in flight at once on the write connection; writes that arrive meanwhile form the
    next batch. 1 gave the most RPC/s and the lowest p99 in the feedback benchmark (batches of
    about 2 instead of 1.3, so fewer round trips and fsyncs; benchmarks/HISTORY.md)."""

    def __post_init__(self) -> None:
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty")
        for name in ("completion_ttl_s", "feedback_ttl_s", "stream_maxlen"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.rate_limit_per_minute < 0:
            raise ValueError("rate_limit_per_minute must be >= 0 (0 disables the limit)")
        if self.principal_rate_limit_per_minute < 0:
            raise ValueError("principal_rate_limit_per_minute must be >= 0 (0 disables it)")
        if self.rate_limit_window_s <= 0:
            raise ValueError("rate_limit_window_s must be positive")
        if self.max_ranking_size < 2:
            raise ValueError("max_ranking_size must be at least 2")
        if self.write_batch_max < 1 or self.write_batches_in_flight < 1:
            raise ValueError("write_batch_max and write_batches_in_flight must be >= 1")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
