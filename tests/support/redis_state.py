"""The tests' Redis databases: a client on a flushed one, and snapshots for checks that a
refused request wrote nothing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import redis

from instructloop.feedback.keys import Keys, RegistryKeys


@contextlib.contextmanager
def flushed_client(url: str, **kwargs: Any) -> Iterator[redis.Redis]:
    """A sync client on the database at `url`, flushed on entry and again on exit."""
    client = redis.Redis.from_url(url, **kwargs)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def key_value(client: Any, key: Any, kind: str, *, stream_length: bool = False) -> Any:
    """The content of one key of type `kind` in a canonical form (DUMP is not: a hash's
    serialized field order can change without any write). With `stream_length` a stream is
    digested to its length: streams only grow, so any write shows there."""
    if kind == "string":
        return client.get(key)
    if kind == "hash":
        return client.hgetall(key)
    if kind == "stream":
        return client.xlen(key) if stream_length else client.xrange(key)
    if kind == "list":
        return client.lrange(key, 0, -1)
    if kind == "set":
        return client.smembers(key)
    if kind == "zset":
        return client.zrange(key, 0, -1, withscores=True)
    if kind == "none":  # expired between the listing of keys and this read
        return None
    raise AssertionError(f"unexpected key type {kind!r}")


def _kind(client: Any, key: Any) -> str:
    kind = client.type(key)
    return kind.decode() if isinstance(kind, bytes) else kind


def db_state(client: Any) -> dict[Any, Any]:
    """Every key of the database with its content and whether it expires: equal states mean
    nothing was written."""
    state: dict[Any, Any] = {}
    for key in client.keys("*"):
        kind = _kind(client, key)
        state[key] = (kind, key_value(client, key, kind), client.ttl(key) >= 0)
    return state


def redis_state(client: Any) -> dict[str, Any]:
    """The serving database's keys with a digest of their content: equal states = nothing
    written. Rate-limit windows (Keys.rate) are left out: they are counters, not records, and
    one set by an earlier request can expire between two snapshots. So are the replicas'
    reports of what they serve (`models:replicas`): each server rewrites its own every few
    seconds, whatever the requests do."""
    rate_prefix = Keys().rate_prefix
    replicas = RegistryKeys().replicas
    state: dict[str, Any] = {}
    for key in sorted(client.scan_iter(count=1000)):
        if key.startswith(rate_prefix) or key == replicas:
            continue
        kind = _kind(client, key)
        state[key] = key_value(client, key, kind, stream_length=True)
    return state


def stored_completion(client: Any, completion_id: str) -> dict[str, Any] | None:
    """The completion record the service stored under `completion_id`, or None."""
    raw = client.hget(Keys().completion(completion_id), "record")
    return None if raw is None else json.loads(raw)
