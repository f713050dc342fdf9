"""The model registry (Redis): every checkpoint the service knows, its lineage, and which one is
live. Serving (ModelService, hot swap) and training (register, gate, promote) share it.

Two classes with the same methods: `ModelRegistry` (sync redis-py; training, CLI, tests) and
`AsyncModelRegistry` (redis.asyncio; the gRPC server). Every change is one Lua script, so it is
atomic and needs no locks; promote and rollback PUBLISH the new live version (the plain version
string, e.g. "v3") on `<prefix>models:events` inside the same script, so no change goes
unannounced. A server subscribes to that channel and re-reads `live()` on each message (and once
at start, since Pub/Sub keeps nothing for a subscriber that was away).

Key layout (prefix `p`, default "il:"):
- `p models:next`            counter for version numbers ("v1", "v2", ...)
- `p models:v:<version>`     hash: version, path, parent, source, created_at, data_snapshot,
                             gate, fingerprint
- `p models:m:<version>`     hash: metric name -> value
- `p models:all`             sorted set: version -> its number (newest first = highest)
- `p models:fp`              hash: "<path>\\n<fingerprint>" -> version (idempotent register)
- `p models:live`            hash: version, since (when it went live)
- `p models:history`         list: previously live versions, most recent first
- `p models:replicas`        hash: replica id -> JSON of what it serves, reported every few
                             seconds by each running server (stale entries are ignored)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

GATES = ("passed", "failed")
HISTORY_MAX = 100  # previously live versions kept for rollback


class RegistryError(Exception):
    """Base class; `grpc_code_name` names the gRPC status the server answers with."""

    grpc_code_name = "FAILED_PRECONDITION"


class UnknownVersion(RegistryError):
    grpc_code_name = "NOT_FOUND"


class ModelPathError(RegistryError):
    """The checkpoint directory is missing or holds no safetensors weights."""


class NoPreviousVersion(RegistryError):
    """Rollback with no earlier live version."""


class GateFailed(RegistryError):
    """Promotion of a version whose evaluation gate failed (a bad checkpoint never goes live)."""


class InvalidModelArgument(RegistryError):
    grpc_code_name = "INVALID_ARGUMENT"


class RegistryUnavailable(RegistryError):
    grpc_code_name = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelVersion:
    """One registered checkpoint."""

    version: str
    path: str
    """Absolute path of the Hugging Face safetensors directory."""
    parent: str | None
    """The version it was trained from; None for a root (e.g. the default model)."""
    source: str
    """How it was made: "init", "register", "sft", "ppo", ..."""
    created_at: float
    data_snapshot: str | None
    """The feedback export (snapshot id) it was trained on, if any."""
    metrics: dict[str, float] = field(default_factory=dict)
    gate: str | None = None
    """"passed", "failed", or None when no gate ran."""
    fingerprint: str = ""
    """sha256 over the directory's safetensors files and config.json."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": self.path,
            "parent": self.parent,
            "source": self.source,
            "created_at": self.created_at,
            "data_snapshot": self.data_snapshot,
            "metrics": dict(self.metrics),
            "gate": self.gate,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class LiveModel:
    """The live version and since when it is live (Unix seconds)."""

    model: ModelVersion
    since: float


def fingerprint(path: Path) -> str:
    """sha256 of the weights (every *.safetensors file, by name and content) and config.json.

    Full content, not sizes or times: a checkpoint that changed in place must not pass for the
    registered one. sha256 runs at about 1.4 GB/s here (0.2 s for the 135M default model).
    """
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors"))
    if (path / "config.json").is_file():
        files.append(path / "config.json")
    for f in files:
        with f.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        h.update(f"{f.name}\0{f.stat().st_size}\0{digest}\n".encode())
    return h.hexdigest()


def _check_path(path: str | Path) -> Path:
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise ModelPathError(f"checkpoint directory {p} does not exist")
    if not any(p.glob("*.safetensors")):
        raise ModelPathError(f"{p} holds no *.safetensors weights")
    return p


# KEYS: 1 counter, 2 all (zset), 3 fingerprints, ARGV: 1 prefix, 2 fp key, 3 path, 4 parent,
# 5 source, 6 created_at, 7 data_snapshot, 8 gate, 9 fingerprint, 10.. metric name, value, ...
_REGISTER = """
local known = redis.call('HGET', KEYS[3], ARGV[2])
if known then return {'KNOWN', known} end
if ARGV[4] ~= '' and redis.call('EXISTS', ARGV[1] .. 'models:v:' .. ARGV[4]) == 0 then
  return {'NOPARENT', ARGV[4]}
end
local n = redis.call('INCR', KEYS[1])
local v = 'v' .. n
redis.call('HSET', ARGV[1] .. 'models:v:' .. v, 'version', v, 'path', ARGV[3], 'parent', ARGV[4],
           'source', ARGV[5], 'created_at', ARGV[6], 'data_snapshot', ARGV[7], 'gate', ARGV[8],
           'fingerprint', ARGV[9])
for i = 10, #ARGV, 2 do
  redis.call('HSET', ARGV[1] .. 'models:m:' .. v, ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', KEYS[2], n, v)
redis.call('HSET', KEYS[3], ARGV[2], v)
return {'NEW', v}
"""

# KEYS: 1 live, 2 history, 3 version hash
# ARGV: 1 version, 2 now, 3 channel, 4 history max, 5 force ("1": even if its gate failed)
_PROMOTE = """
if redis.call('EXISTS', KEYS[3]) == 0 then return {'UNKNOWN'} end
if redis.call('HGET', KEYS[3], 'gate') == 'failed' and ARGV[5] ~= '1' then
  return {'GATE'}
end
local cur = redis.call('HGET', KEYS[1], 'version')
if cur == ARGV[1] then return {'SAME', cur} end
if cur then
  redis.call('LPUSH', KEYS[2], cur)
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'since', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return {'OK', cur or ''}
"""

# KEYS: 1 live, 2 history; ARGV: 1 now, 2 channel
_ROLLBACK = """
local prev = redis.call('LPOP', KEYS[2])
if not prev then return {'EMPTY'} end
local cur = redis.call('HGET', KEYS[1], 'version')
redis.call('HSET', KEYS[1], 'version', prev, 'since', ARGV[1])
redis.call('PUBLISH', ARGV[2], prev)
return {'OK', prev, cur or ''}
"""


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _parse_version(h: dict[Any, Any], m: dict[Any, Any]) -> ModelVersion:
    d = {_s(k): _s(v) for k, v in h.items()}
    return ModelVersion(
        version=d["version"],
        path=d["path"],
        parent=d.get("parent") or None,
        source=d["source"],
        created_at=float(d["created_at"]),
        data_snapshot=d.get("data_snapshot") or None,
        metrics={_s(k): float(_s(v)) for k, v in m.items()},
        gate=d.get("gate") or None,
        fingerprint=d.get("fingerprint", ""),
    )


REPLICA_STALE_S = 30.0
"""A replica report older than this is from a replica that stopped or lost Redis."""


def _fresh_replica(
    raw: Any, now: float, max_age_s: float = REPLICA_STALE_S
) -> dict[str, Any] | None:
    try:
        doc = json.loads(_s(raw))
    except ValueError:
        return None
    if not isinstance(doc, dict) or now - float(doc.get("reported_at", 0)) > max_age_s:
        return None
    return doc


def _fresh_replicas(raw: dict[Any, Any], max_age_s: float) -> list[dict[str, Any]]:
    now = time.time()
    docs = (_fresh_replica(v, now, max_age_s) for v in raw.values())
    return sorted((d for d in docs if d is not None), key=lambda d: str(d.get("replica_id")))


def _check_metrics(metrics: dict[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str) or not k:
            raise InvalidModelArgument("metric names must be non-empty strings")
        try:
            out[k] = float(v)
        except (TypeError, ValueError) as e:
            raise InvalidModelArgument(f"metric {k!r} must be a number, got {v!r}") from e
    return out


def _check_gate(gate: str | None) -> str:
    if gate is None or gate == "":
        return ""
    if gate not in GATES:
        raise InvalidModelArgument(f"gate must be 'passed', 'failed' or None, got {gate!r}")
    return gate


class _Layout:
    def __init__(self, prefix: str) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty")
        self.prefix = prefix
        self.counter = f"{prefix}models:next"
        self.all = f"{prefix}models:all"
        self.fps = f"{prefix}models:fp"
        self.live = f"{prefix}models:live"
        self.history = f"{prefix}models:history"
        self.events = f"{prefix}models:events"
        self.replicas = f"{prefix}models:replicas"

    def version(self, v: str) -> str:
        return f"{self.prefix}models:v:{v}"

    def metrics(self, v: str) -> str:
        return f"{self.prefix}models:m:{v}"

    def register_args(
        self,
        path: Path,
        fp: str,
        *,
        source: str,
        parent: str | None,
        data_snapshot: str | None,
        metrics: dict[str, float] | None,
        gate: str | None,
    ) -> tuple[list[str], list[str]]:
        if not source:
            raise InvalidModelArgument("source is required (e.g. 'init', 'sft', 'ppo')")
        args = [
            self.prefix,
            f"{path}\n{fp}",
            str(path),
            parent or "",
            source,
            repr(time.time()),
            data_snapshot or "",
            _check_gate(gate),
            fp,
        ]
        for name, value in _check_metrics(metrics).items():
            args += [name, repr(value)]  # repr: the float's exact digits
        return [self.counter, self.all, self.fps], args


def _register_result(res: list[Any]) -> tuple[str, str]:
    status, value = _s(res[0]), _s(res[1])
    if status == "NOPARENT":
        raise UnknownVersion(f"parent version {value} is not registered")
    return status, value


def _promote_result(res: list[Any], version: str) -> None:
    status = _s(res[0])
    if status == "UNKNOWN":
        raise UnknownVersion(f"model version {version} is not registered")
    if status == "GATE":
        raise GateFailed(
            f"model version {version} failed its evaluation gate and cannot go live "
            "(force=True overrides)"
        )


def _unavailable(e: Exception) -> RegistryUnavailable:
    return RegistryUnavailable(f"the model registry's Redis is unavailable: {e}")


class ModelRegistry:
    """The registry over sync redis-py."""

    def __init__(self, redis_url_or_client: str | redis.Redis, prefix: str = "il:") -> None:
        if isinstance(redis_url_or_client, str):
            self.client = redis.Redis.from_url(
                redis_url_or_client, socket_timeout=10, socket_connect_timeout=5
            )
        else:
            self.client = redis_url_or_client
        self.keys = _Layout(prefix)

    @property
    def events_channel(self) -> str:
        """Pub/Sub channel; each message is the new live version (e.g. b"v3")."""
        return self.keys.events

    def close(self) -> None:
        self.client.close()

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise _unavailable(e) from e

    def register(
        self,
        path: str | Path,
        *,
        source: str,
        parent: str | None = None,
        data_snapshot: str | None = None,
        metrics: dict[str, float] | None = None,
        gate: str | None = None,
    ) -> ModelVersion:
        """Register a checkpoint directory; the same directory with the same content again
        returns the version it already has (its other arguments are then ignored)."""
        p = _check_path(path)
        fp = fingerprint(p)
        keys, args = self.keys.register_args(
            p, fp, source=source, parent=parent, data_snapshot=data_snapshot, metrics=metrics,
            gate=gate,
        )  # fmt: skip
        res = self._call(self.client.eval, _REGISTER, len(keys), *keys, *args)
        _, version = _register_result(res)
        return self.get(version)

    def get(self, version: str) -> ModelVersion:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.version(version))
        pipe.hgetall(self.keys.metrics(version))
        h, m = self._call(pipe.execute)
        if not h:
            raise UnknownVersion(f"model version {version!r} is not registered")
        return _parse_version(h, m)

    def list(self) -> list[ModelVersion]:
        """Every version, newest first."""
        versions = [_s(v) for v in self._call(self.client.zrevrange, self.keys.all, 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        for v in versions:
            pipe.hgetall(self.keys.version(v))
            pipe.hgetall(self.keys.metrics(v))
        res = self._call(pipe.execute)
        return [_parse_version(h, m) for h, m in zip(res[::2], res[1::2], strict=True) if h]

    def live(self) -> ModelVersion | None:
        state = self.live_state()
        return state.model if state else None

    def live_state(self) -> LiveModel | None:
        h = self._call(self.client.hgetall, self.keys.live)
        if not h:
            return None
        d = {_s(k): _s(v) for k, v in h.items()}
        return LiveModel(self.get(d["version"]), float(d["since"]))

    def history(self) -> list[str]:
        """Previously live versions, most recent first (what rollback walks back through)."""
        return [_s(v) for v in self._call(self.client.lrange, self.keys.history, 0, -1)]

    def replicas(self, max_age_s: float = REPLICA_STALE_S) -> list[dict[str, Any]]:
        """The serving replicas that reported within `max_age_s`, by id (see report_replica)."""
        raw = self._call(self.client.hgetall, self.keys.replicas)
        return _fresh_replicas(raw, max_age_s)

    def promote(self, version: str, *, force: bool = False) -> ModelVersion:
        """Make `version` live (the current live one goes onto the history) and announce it.

        Promoting the live version again changes nothing and announces nothing. A version whose
        gate failed is refused unless `force`; a version whose directory is gone is refused.
        """
        mv = self.get(version)
        _check_path(mv.path)
        k = self.keys
        res = self._call(
            self.client.eval, _PROMOTE, 3, k.live, k.history, k.version(version), version,
            repr(time.time()), k.events, str(HISTORY_MAX), "1" if force else "0",
        )  # fmt: skip
        _promote_result(res, version)
        return mv

    def rollback(self) -> ModelVersion:
        """Make the previously live version live again (the one rolled back from is dropped,
        so a second rollback goes further back) and announce it."""
        k = self.keys
        res = self._call(
            self.client.eval, _ROLLBACK, 2, k.live, k.history, repr(time.time()), k.events
        )
        if _s(res[0]) == "EMPTY":
            raise NoPreviousVersion("no previously live version to roll back to")
        return self.get(_s(res[1]))

    def set_gate(self, version: str, gate: str | None) -> ModelVersion:
        g = _check_gate(gate)
        self.get(version)
        self._call(self.client.hset, self.keys.version(version), "gate", g)
        return self.get(version)

    def update_metrics(self, version: str, metrics: dict[str, float]) -> ModelVersion:
        """Add or overwrite metrics of a version (others are kept)."""
        m = _check_metrics(metrics)
        self.get(version)
        if m:
            self._call(self.client.hset, self.keys.metrics(version), mapping=m)
        return self.get(version)

    def ensure_live(self, path: str | Path, *, source: str = "init") -> ModelVersion:
        """Register `path` and make it live if nothing is live yet; return the live version.

        What `serve`/`up` call at start with the default model.
        """
        current = self.live()
        if current is not None:
            return current
        mv = self.register(path, source=source)
        self.promote(mv.version)
        return self.live() or mv


class AsyncModelRegistry:
    """The same registry over redis.asyncio, for the gRPC server (same methods, awaited).

    `register` hashes the weights in a worker thread so the event loop keeps serving.
    """

    def __init__(self, redis_url_or_client: str | aioredis.Redis, prefix: str = "il:") -> None:
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
    ) -> ModelVersion:
        p = _check_path(path)
        fp = await asyncio.to_thread(fingerprint, p)
        keys, args = self.keys.register_args(
            p, fp, source=source, parent=parent, data_snapshot=data_snapshot, metrics=metrics,
            gate=gate,
        )  # fmt: skip
        res = await self._call(self.client.eval(_REGISTER, len(keys), *keys, *args))
        _, version = _register_result(res)
        return await self.get(version)

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
