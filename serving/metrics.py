"""Prometheus metrics of the gRPC server, on their own HTTP port.

Names carry the `instructloop_` prefix, use base units (seconds, tokens) and end in `_total`
for counters (prometheus_client adds the suffix). Each server has its own CollectorRegistry, so
several servers in one process (tests) never share or clash on series.

The same port also serves vLLM's own engine metrics (`vllm:*`: queue, KV cache, prefix cache,
token counts), which vLLM's stat logger keeps in prometheus_client's global registry, as
`vllm serve` exposes them: operators get both on one scrape.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.metrics_core import Metric

# Latency buckets for a small model on a CPU up to a large one on a GPU: 5 ms .. 2 min.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        """Every series, defined once in a flat list (long, but one definition per metric reads
        best and matches deploy/prometheus/alerts.yml)."""
        r = self.registry
        self.requests = Counter(
            "instructloop_requests",
            "Finished RPCs by method and gRPC status code.",
            ["rpc", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            "instructloop_request_duration_seconds",
            "Time from the RPC's arrival to its last message or error.",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "instructloop_requests_in_flight", "RPCs being served now.", ["rpc"], registry=r
        )
        self.ttft = Histogram(
            "instructloop_time_to_first_token_seconds",
            "Time from a completion request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "instructloop_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one candidate.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "instructloop_prompt_tokens", "Prompt tokens of served completions.", registry=r
        )
        self.generation_tokens = Counter(
            "instructloop_generation_tokens",
            "Generated tokens, all candidates counted.",
            registry=r,
        )
        self.completions_logged = Counter(
            "instructloop_completions_logged",
            "Completions durably written to Redis.",
            registry=r,
        )
        self.feedback_records = Counter(
            "instructloop_feedback_records",
            "Feedback records stored, by kind (idempotent replays are not counted again).",
            ["kind"],
            registry=r,
        )
        self.feedback_duplicates = Counter(
            "instructloop_feedback_duplicates",
            "Idempotent replays of stored feedback (a client's retry), by kind: acknowledged "
            "with the first record, not stored again.",
            ["kind"],
            registry=r,
        )
        self.redis_write_errors = Counter(
            "instructloop_redis_write_errors",
            "Writes to Redis that failed (the RPC answered UNAVAILABLE), by operation.",
            ["op"],
            registry=r,
        )
        # Quotas (serving/quotas.py; the feedback store's limits). Principals are the
        # operator's configured few, so the principal label stays bounded.
        self.quota_refusals = Counter(
            "instructloop_quota_refusals",
            "Requests refused for a quota, by principal and kind: requests and tokens "
            "(completions per minute), feedback (the principal's feedback per minute), "
            "feedback_user (one user's within it).",
            ["principal", "kind"],
            registry=r,
        )
        self.quota_errors = Counter(
            "instructloop_quota_errors",
            "Quota checks or charges that could not reach Redis (the request went through).",
            registry=r,
        )
        self.served_model = Gauge(
            "instructloop_served_model_info",
            "The model version this replica serves (value 1 on the current version's series).",
            ["version", "path", "replica"],
            registry=r,
        )
        self.engine_up = Gauge(
            "instructloop_engine_up", "1 while the vLLM engine serves, 0 while it is down.",
            registry=r,
        )  # fmt: skip
        self.engine_restarts = Counter(
            "instructloop_engine_restarts", "Restarts of a dead vLLM engine.", registry=r
        )
        self.engine_aborts = Counter(
            "instructloop_engine_aborted_requests",
            "Engine requests aborted before they finished (cancelled, deadline, error).",
            registry=r,
        )
        self.engine_running = Gauge(
            "instructloop_engine_running_requests",
            "Sequences the engine's scheduler runs (last step).",
            registry=r,
        )
        self.engine_waiting = Gauge(
            "instructloop_engine_waiting_requests",
            "Sequences waiting in the engine's scheduler (last step).",
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "instructloop_engine_kv_cache_usage_ratio",
            "Fraction of the KV cache in use (last step).",
            registry=r,
        )
        # Hot swap (serving/hot_swap.py)
        self.swaps = Counter(
            "instructloop_swaps",
            "Hot swaps of the served model by outcome (ok, failed).",
            ["outcome"],
            registry=r,
        )
        self.swap_duration = Histogram(
            "instructloop_swap_duration_seconds",
            "Hot swap phases: verify (fingerprint and checks, still serving), drain (in-flight "
            "requests finish or are aborted), load (weights into the engine), total (drain + "
            "load: admission closed, new requests wait this long).",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.swap_failed = Gauge(
            "instructloop_swap_failed",
            "1 while this replica could not load the live version and serves an older one.",
            registry=r,
        )
        self.behind_live = Gauge(
            "instructloop_replica_behind_live",
            "1 while this replica serves another version than the registry's live one (a swap "
            "under way or failed, a fallback at start, a pinned replica after a promotion).",
            registry=r,
        )
        # Start-up fallback and pinning (serving/fallback.py, serving/replica.py)
        self.serving_fallback = Gauge(
            "instructloop_serving_fallback",
            "1 while this replica serves an older version because the live one would not load "
            "when it started (GetServingModel's fallback_reason says why).",
            registry=r,
        )
        self.pinned = Gauge(
            "instructloop_replica_pinned",
            "1 when this replica serves a fixed version (serve --model) and ignores promotions.",
            registry=r,
        )
        self.swap_restarted_requests = Counter(
            "instructloop_swap_restarted_requests",
            "Requests a hot swap aborted mid-generation and started again on the new version.",
            registry=r,
        )
        self._lock = threading.Lock()
        self._model_labels: tuple[str, str, str] | None = None
        self._http: Any = None
        self._engine_metrics_added = False
        self.port: int | None = None

    def set_served_model(self, version: str, path: str, replica: str) -> None:
        with self._lock:
            if self._model_labels is not None:
                self.served_model.remove(*self._model_labels)
            self._model_labels = (version, path, replica)
            self.served_model.labels(version, path, replica).set(1)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server (port 0: a free one); return its port."""
        if not self._engine_metrics_added:
            self.registry.register(EngineMetrics())
            self._engine_metrics_added = True
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        self.port = int(server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class EngineMetrics:
    """vLLM's `vllm:*` families from the process-wide registry, collected at scrape time (the
    engine registers them when it starts, and again after a restart)."""

    PREFIX = "vllm:"

    def describe(self) -> list[Metric]:
        return []  # names vary with the engine's version: nothing to reserve at registration

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith(self.PREFIX):
                yield family
