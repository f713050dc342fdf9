"""`AsyncModelRegistry`: the registry over redis.asyncio (the gRPC server), same methods."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from instructloop.feedback.keys import DEFAULT_KEY_PREFIX
from instructloop.paths import checkpoint_roots
from instructloop.registry.scripts import (
    _PROMOTE,
    _REGISTER,
    _ROLLBACK,
    _Layout,
    _promote_result,
    _register_result,
    _unavailable,
)
from instructloop.registry.verify import check_roots, verify_checkpoint
from instructloop.registry.versions import (
    HISTORY_MAX,
    LiveModel,
    ModelVersion,
    NoPreviousVersion,
    UnknownVersion,
    _check_gate,
    _check_metrics,
    _check_path,
    _check_verify,
    _fresh_replica,
    _parse_version,
    _s,
    _verified_enough,
    fingerprint,
)


class AsyncModelRegistry:
    """The same registry over redis.asyncio, for the gRPC server (same methods, awaited).

    `register` hashes the weights in a worker thread so the event loop keeps serving.
    """

    def __init__(
        self, redis_url_or_client: str | aioredis.Redis, prefix: str = DEFAULT_KEY_PREFIX
    ) -> None:
        if isinstance(redis_url_or_client, str):
            self.client = aioredis.Redis.from_url(
                redis_url_or_client, socket_timeout=10, socket_connect_timeout=5
            )
        else:
            self.client = redis_url_or_client
        self.keys = _Layout(prefix)

    @property
    def events_channel(self) -> str:
        return self.keys.events

    async def close(self) -> None:
        await self.client.aclose()

    async def report_replica(self, replica_id: str, info: dict[str, Any]) -> None:
        """A serving replica says what it serves (every few seconds while it runs), so that
        `instructloop status` lists the replicas and their versions. Reports older than
        REPLICA_STALE_S are ignored by readers and removed by the next report."""
        now = time.time()
        doc = json.dumps({**info, "replica_id": replica_id, "reported_at": now})
        raw = await self._call(self.client.hgetall(self.keys.replicas))
        gone = [k for k, v in raw.items() if _s(k) != replica_id and not _fresh_replica(v, now)]
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys.replicas, replica_id, doc)
        if gone:
            pipe.hdel(self.keys.replicas, *gone)
        await self._call(pipe.execute())

    async def remove_replica(self, replica_id: str) -> None:
        await self._call(self.client.hdel(self.keys.replicas, replica_id))

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise _unavailable(e) from e

    async def register(
        self,
        path: str | Path,
        *,
        source: str,
        parent: str | None = None,
        data_snapshot: str | None = None,
        metrics: dict[str, float] | None = None,
        gate: str | None = None,
        verify: str | None = "static",
        roots: Sequence[str | Path] | None = None,
    ) -> ModelVersion:
        """ModelRegistry.register; the file checks run in a worker thread."""
        how = _check_verify(verify)
        bounds = checkpoint_roots() if roots is None else roots

        def check() -> tuple[Path, str]:
            p = _check_path(check_roots(path, bounds))
            return p, fingerprint(p)

        p, fp = await asyncio.to_thread(check)
        keys, args = self.keys.register_args(
            p, fp, source=source, parent=parent, data_snapshot=data_snapshot, metrics=metrics,
            gate=gate, verified=how,
        )  # fmt: skip
        if how and not _verified_enough(await self._recorded_verification(p, fp), how):
            await asyncio.to_thread(verify_checkpoint, p, how=how, roots=bounds)
        res = await self._call(self.client.eval(_REGISTER, len(keys), *keys, *args))
        _, version = _register_result(res)
        return await self.get(version)

    async def _recorded_verification(self, path: Path, fp: str) -> str | None:
        known = await self._call(self.client.hget(self.keys.fps, self.keys.fp_field(path, fp)))
        if not known:
            return None
        return (await self.get(_s(known))).verified

    async def get(self, version: str) -> ModelVersion:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.version(version))
        pipe.hgetall(self.keys.metrics(version))
        h, m = await self._call(pipe.execute())
        if not h:
            raise UnknownVersion(f"model version {version!r} is not registered")
        return _parse_version(h, m)

    async def list(self) -> list[ModelVersion]:
        versions = [_s(v) for v in await self._call(self.client.zrevrange(self.keys.all, 0, -1))]
        pipe = self.client.pipeline(transaction=False)
        for v in versions:
            pipe.hgetall(self.keys.version(v))
            pipe.hgetall(self.keys.metrics(v))
        res = await self._call(pipe.execute())
        return [_parse_version(h, m) for h, m in zip(res[::2], res[1::2], strict=True) if h]

    async def live(self) -> ModelVersion | None:
        state = await self.live_state()
        return state.model if state else None

    async def live_state(self) -> LiveModel | None:
        h = await self._call(self.client.hgetall(self.keys.live))
        if not h:
            return None
        d = {_s(k): _s(v) for k, v in h.items()}
        return LiveModel(await self.get(d["version"]), float(d["since"]))

    async def history(self) -> list[str]:
        return [_s(v) for v in await self._call(self.client.lrange(self.keys.history, 0, -1))]

    async def promote(self, version: str, *, force: bool = False) -> ModelVersion:
        mv = await self.get(version)
        _check_path(mv.path)
        k = self.keys
        res = await self._call(
            self.client.eval(
                _PROMOTE, 3, k.live, k.history, k.version(version), version, repr(time.time()),
                k.events, str(HISTORY_MAX), "1" if force else "0",
            )
        )  # fmt: skip
        _promote_result(res, version)
        return mv

    async def rollback(self) -> ModelVersion:
        k = self.keys
        res = await self._call(
            self.client.eval(_ROLLBACK, 2, k.live, k.history, repr(time.time()), k.events)
        )
        if _s(res[0]) == "EMPTY":
            raise NoPreviousVersion("no previously live version to roll back to")
        return await self.get(_s(res[1]))

    async def set_gate(self, version: str, gate: str | None) -> ModelVersion:
        g = _check_gate(gate)
        await self.get(version)
        await self._call(self.client.hset(self.keys.version(version), "gate", g))
        return await self.get(version)

    async def update_metrics(self, version: str, metrics: dict[str, float]) -> ModelVersion:
        m = _check_metrics(metrics)
        await self.get(version)
        if m:
            await self._call(self.client.hset(self.keys.metrics(version), mapping=m))
        return await self.get(version)
