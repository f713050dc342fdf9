"""Hot swap: keep one server replica on the registry's live version, without a restart.

How a replica learns of a promotion. The registry's promote and rollback PUBLISH the new live
version on `<prefix>models:events` inside the same Lua script that changes it
(instructloop/registry.py). The swapper subscribes, and on every message AND every
`swap_poll_s` re-reads the live version: Pub/Sub keeps nothing for a subscriber that was away
(Redis restarted, the connection dropped), so the poll is what makes every replica converge.
It also re-reads once right after subscribing, so a promotion between start and subscription
is not missed.

How it swaps. `Engine.swap` (serving/engine.py) does the work: validate, close admission, drain
or abort and restart the requests in flight, load through instructloop.weight_sync (the method
that is right for tied embeddings), open admission on the new version. This module decides
when, verifies the checkpoint is the one registered (its fingerprint), and reports:
`instructloop_swaps_total{outcome}`, `instructloop_swap_duration_seconds{phase}`,
`instructloop_swap_failed` (the alert: the replica serves an older version because the live one
did not load) and `instructloop_replica_behind_live`.

A failed swap changes nothing: the old version keeps serving, the reason is logged, the alert
metric is set, and the same version is tried again after `swap_retry_s` (a newer one at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from instructloop.registry import AsyncModelRegistry, ModelVersion, fingerprint
from instructloop.serving.config import ServerConfig
from instructloop.serving.engine import Engine
from instructloop.serving.engine_types import SwapResult
from instructloop.serving.metrics import ServerMetrics
from instructloop.serving.replica import ServedModel
from instructloop.weight_sync import warm_validation

log = logging.getLogger("instructloop.serving.hot_swap")


@dataclass
class _Failure:
    version: str
    reason: str
    retry_at: float


class HotSwapper:
    """Keeps one replica's engine on the registry's live version.

    `settings` is called on every attempt, so a changed server config (its swap timings) applies
    to the next swap; `served` is told of every version the engine serves from then on.
    """

    def __init__(
        self,
        engine: Engine,
        registry: AsyncModelRegistry,
        metrics: ServerMetrics,
        served: ServedModel,
        settings: Callable[[], ServerConfig],
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.served = served
        self.settings = settings
        self.failure: _Failure | None = None
        self.swaps = 0
        self._stopped = False

    def stop(self) -> None:
        """Swap nothing more, whatever happens to the task's cancellation: a swapper that
        outlives its server (a cancellation lost in a Redis client's read) would otherwise keep
        a shared engine on its own registry's live version."""
        self._stopped = True

    @property
    def last_error(self) -> str | None:
        return None if self.failure is None else self.failure.reason

    async def run(self) -> None:
        """Forever (cancel to stop): subscribe, reconcile on each message and each poll. Redis
        errors are logged and retried; they never stop the replica from serving."""
        with contextlib.suppress(Exception):  # an optimisation only; validation runs anyway
            await asyncio.to_thread(warm_validation, self.engine.llm)
        backoff = 0.5
        while not self._stopped:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("hot swap: following the registry failed (%s); retrying", e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings().swap_poll_s * 4)
            else:  # _follow returns once stopped
                backoff = 0.5

    async def _follow(self) -> None:
        pubsub = self.registry.client.pubsub()
        try:
            await pubsub.subscribe(self.registry.events_channel)
            await self.reconcile()
            while not self._stopped:
                await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=self.settings().swap_poll_s
                )
                await self.reconcile()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def reconcile(self) -> None:
        """Swap to the live version if this replica serves another one (and may try now)."""
        if self._stopped:
            return
        live = await self.registry.live()
        if live is None or self._stopped:
            return
        if live.version == self.engine.model_version:
            self._clear()
            if self.served.model.version != live.version:  # a shared engine swapped elsewhere
                self.served.set(live, self.engine.serving_since)
            return
        self.metrics.behind_live.set(1)
        f = self.failure
        if f is not None and f.version == live.version and time.monotonic() < f.retry_at:
            return
        await self.swap_to(live)

    async def swap_to(self, mv: ModelVersion) -> bool:
        """One swap attempt; True if the engine now serves `mv`."""
        cfg = self.settings()
        t0 = time.perf_counter()
        verify_s = 0.0
        try:
            if cfg.swap_verify_fingerprint and mv.fingerprint:
                fp = await asyncio.to_thread(fingerprint, Path(mv.path))
                verify_s = time.perf_counter() - t0
                if fp != mv.fingerprint:
                    raise ValueError(
                        f"{mv.path} changed since {mv.version} was registered (fingerprint "
                        f"{fp[:12]}, registered {mv.fingerprint[:12]}); refusing to load it"
                    )
            res = await self.engine.swap(
                mv.path, mv.version, drain_timeout_s=cfg.swap_drain_timeout_s
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            self.failure = _Failure(mv.version, reason, time.monotonic() + cfg.swap_retry_s)
            self.metrics.swaps.labels("failed").inc()
            self.metrics.swap_failed.set(1)
            log.error(
                "hot swap to %s (%s) failed; still serving %s: %s",
                mv.version, mv.path, self.engine.model_version, reason,
            )  # fmt: skip
            return False
        if res is not None:
            self._record(res, verify_s)
        self._clear()
        self.served.set(mv, self.engine.serving_since)
        return True

    def _record(self, res: SwapResult, verify_s: float) -> None:
        """Metrics and a log line for a swap that happened."""
        self.swaps += 1
        m = self.metrics
        m.swaps.labels("ok").inc()
        m.swap_duration.labels("verify").observe(verify_s + res.validate_s)
        m.swap_duration.labels("drain").observe(res.drain_s)
        m.swap_duration.labels("load").observe(res.load_s)
        m.swap_duration.labels("total").observe(res.paused_s)
        log.warning(
            "hot swap %s -> %s: verify %.2f s (still serving), then drain %.2f s, load "
            "%.2f s, %d requests restarted",
            res.previous, res.version, verify_s + res.validate_s, res.drain_s, res.load_s,
            res.restarted,
        )  # fmt: skip

    def _clear(self) -> None:
        self.failure = None
        self.metrics.swap_failed.set(0)
        self.metrics.behind_live.set(0)
