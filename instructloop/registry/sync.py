"""`ModelRegistry`: the registry over sync redis-py (training, the CLI, tests)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

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
    REPLICA_STALE_S,
    LiveModel,
    ModelVersion,
    NoPreviousVersion,
    UnknownVersion,
    _check_gate,
    _check_metrics,
    _check_path,
    _check_verify,
    _fresh_replicas,
    _parse_version,
    _s,
    _verified_enough,
    fingerprint,
)


class ModelRegistry:
    """The registry over sync redis-py."""

    def __init__(
        self, redis_url_or_client: str | redis.Redis, prefix: str = DEFAULT_KEY_PREFIX
    ) -> None:
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
        verify: str | None = "static",
        roots: Sequence[str | Path] | None = None,
    ) -> ModelVersion:
        """Register a checkpoint directory; the same directory with the same content again
        returns the version it already has (its other arguments are then ignored, but a
        stronger `verify` than it had is recorded).

        The directory must lie under `roots` (None: the configured checkpoint roots,
        `paths.checkpoint_roots`), every symlink in it included, and pass `verify`
        (instructloop/registry/verify.py): "static" (weights whole and of config.json's
        architecture, tokenizer and chat template present), "load" (also loaded in an engine),
        or None: not verified, so it goes live only with force. Raises CheckpointRejected."""
        how = _check_verify(verify)
        bounds = checkpoint_roots() if roots is None else roots
        p = _check_path(check_roots(path, bounds))
        fp = fingerprint(p)
        keys, args = self.keys.register_args(
            p, fp, source=source, parent=parent, data_snapshot=data_snapshot, metrics=metrics,
            gate=gate, verified=how,
        )  # fmt: skip
        if how and not _verified_enough(self._recorded_verification(p, fp), how):
            verify_checkpoint(p, how=how, roots=bounds)
        res = self._call(self.client.eval, _REGISTER, len(keys), *keys, *args)
        _, version = _register_result(res)
        return self.get(version)

    def _recorded_verification(self, path: Path, fp: str) -> str | None:
        """How the version of this directory and content (if any) was verified: the same
        files need not be checked again (a server registers its model at every start)."""
        known = self._call(self.client.hget, self.keys.fps, self.keys.fp_field(path, fp))
        if not known:
            return None
        return self.get(_s(known)).verified

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
