"""This replica: what it serves (`ServedModel`: the version, whether it is pinned or on a
fallback), and the background tasks that keep the registry's replica report, the engine metrics
and the live-versus-served metrics up to date."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from instructloop.registry import AsyncModelRegistry, ModelVersion
from instructloop.serving.engine import Engine
from instructloop.serving.metrics import ServerMetrics

log = logging.getLogger("instructloop.serving")

REPLICA_REPORT_S = 5.0
"""How often a replica reports what it serves (instructloop/registry.py: report_replica)."""
ENGINE_POLL_S = 0.5
"""How often the engine's scheduler stats and liveness are read."""


@dataclass(frozen=True)
class Fallback:
    """Why this replica serves another version than the live one it started for."""

    wanted: str
    """The live version that would not load."""
    reason: str


class ServedModel:
    """The version this replica serves, and since when. Set at start, changed by a hot swap (or
    by another server's swap of a shared engine) and by an engine restart; read by
    ModelService, the replica report and the metrics. Also whether the replica is pinned
    (`serve --model`: it ignores promotions) and whether it serves a fallback (the live version
    would not load at start: serving/fallback.py)."""

    def __init__(self, metrics: ServerMetrics, replica_id: str) -> None:
        self._metrics = metrics
        self._replica_id = replica_id
        self.model: ModelVersion
        self.since = 0.0
        self.pinned = False
        self.fallback: Fallback | None = None

    def set(self, mv: ModelVersion, since: float) -> None:
        """The engine serves `mv` since `since`: what GetServingModel and the metrics report."""
        self.model = mv
        self.since = since
        self._metrics.set_served_model(mv.version, mv.path, self._replica_id)

    def set_pinned(self, pinned: bool) -> None:
        self.pinned = pinned
        self._metrics.pinned.set(1 if pinned else 0)

    def set_fallback(self, fallback: Fallback | None) -> None:
        self.fallback = fallback
        self._metrics.serving_fallback.set(0 if fallback is None else 1)

    def observe_live(self, live: str | None) -> None:
        """The registry's live version, as just read. A pinned replica shows whether it differs
        from what it serves (a follower's swapper keeps that metric itself); a fallback ends
        once this replica serves the live version (a swap to a fixed one, or a rollback)."""
        if self.pinned:
            self._metrics.behind_live.set(1 if live and live != self.model.version else 0)
        if self.fallback is not None and live == self.model.version:
            log.warning("serving the live version %s: no longer on a fallback", live)
            self.set_fallback(None)


async def report_replica(
    registry: AsyncModelRegistry, replica_id: str, info: Callable[[], dict[str, Any]]
) -> None:
    """Tell the registry what this replica serves (`info()`), every REPLICA_REPORT_S, for
    `instructloop status` (a Redis error only skips a report). Runs until cancelled."""
    while True:
        report = info()
        try:
            await registry.report_replica(replica_id, report)
        except Exception as e:
            log.debug("replica report failed: %s", e)
        await asyncio.sleep(REPLICA_REPORT_S)


async def watch_live(
    registry: AsyncModelRegistry, served: ServedModel, poll_s: Callable[[], float]
) -> None:
    """Read the registry's live version every `poll_s()` seconds into `served.observe_live`
    (a Redis error only skips a read). Runs until cancelled."""
    while True:
        try:
            live = await registry.live()
        except Exception as e:
            log.debug("reading the live version failed: %s", e)
        else:
            served.observe_live(live.version if live is not None else None)
        await asyncio.sleep(poll_s())


async def watch_engine_stats(engine: Engine, metrics: ServerMetrics) -> None:
    """Copy the engine's scheduler stats into the metrics. Runs until cancelled."""
    aborted = engine.stats.aborted_requests
    while True:
        s = engine.stats
        metrics.engine_running.set(s.num_running_reqs)
        metrics.engine_waiting.set(s.num_waiting_reqs)
        metrics.kv_cache_usage.set(s.kv_cache_usage)
        if s.aborted_requests > aborted:
            metrics.engine_aborts.inc(s.aborted_requests - aborted)
            aborted = s.aborted_requests
        await asyncio.sleep(ENGINE_POLL_S)


async def follow_shared_engine(
    engine: Engine, metrics: ServerMetrics, set_serving: Callable[[bool], Awaitable[None]]
) -> None:
    """Health for a server on a shared engine (another server supervises it): mirror the
    engine's state. Runs until cancelled."""
    up = True
    restarts = engine.restarts
    while True:
        await asyncio.sleep(ENGINE_POLL_S)
        now_up = engine.alive
        if now_up != up:
            up = now_up
            metrics.engine_up.set(1 if up else 0)
            await set_serving(up)
        if engine.restarts != restarts:
            metrics.engine_restarts.inc(engine.restarts - restarts)
            restarts = engine.restarts
