"""Redis locks of the training loop: the cycle lock (with a fencing token) and the beat lock.

Cycle lock. At most one cycle runs at a time. `acquire` takes a fresh token from a Redis counter
(INCR, so tokens only grow) and stores `"<cycle_id>:<token>"` under the lock key with a TTL, in
one script. Whoever writes a result on behalf of a cycle (a step output, the "last reward model"
pointer, a promotion) first checks, in the same script as the write, that the lock still holds
that exact value. A holder whose lock expired and was taken by a newer cycle therefore cannot
write anything any more, even if it wakes up late: the classic fencing token (Kleppmann, "How to
do distributed locking"). A lock whose TTL ran out while nobody else took it can be reclaimed by
its own holder (the counter still equals its token): a cycle that waited for broker redelivery
after a worker crash carries on.

Beat lock. `instructloop beat` runs only while it holds this lock and renews it on every
scheduler tick; a second beat waits (a hot standby) or exits.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

# KEYS: 1 lock, 2 fence counter. ARGV: 1 cycle id, 2 ttl ms.
# Returns {token, ""} on success, {0, current value} when held.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur} end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. t, 'PX', tonumber(ARGV[2]))
return {t, ''}
"""

# KEYS: 1 lock, 2 fence counter. ARGV: 1 "<cycle>:<token>", 2 ttl ms, 3 token.
# 1 = held and extended, 2 = had expired, nobody took it since: reclaimed, 0 = lost.
_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
if (not cur) and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 2
end
return 0
"""

# KEYS: 1 lock, 2..1+c keys that must hold given values, then the hashes to write.
# ARGV: 1 "<cycle>:<token>", 2 c, 3..2+c the required values, then for each hash: field
# count n, then n field/value pairs. Returns 1 written, 0 lock lost, -1 a requirement failed.
_FENCED_HSET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local c = tonumber(ARGV[2])
for k = 1, c do
  if redis.call('GET', KEYS[1 + k]) ~= ARGV[2 + k] then return -1 end
end
local i = 3 + c
for k = 2 + c, #KEYS do
  local n = tonumber(ARGV[i])
  local fields = {}
  for j = 1, 2 * n do fields[j] = ARGV[i + j] end
  if n > 0 then redis.call('HSET', KEYS[k], unpack(fields)) end
  i = i + 2 * n + 1
end
return 1
"""

# KEYS: 1 lock. ARGV: 1 expected value. Compare-and-delete.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: 1 lock. ARGV: 1 expected value, 2 ttl ms. Compare-and-extend.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""


class LockLost(Exception):
    """The fencing token is no longer current: a newer holder took the lock."""


@dataclass(frozen=True, slots=True)
class Holder:
    cycle_id: str
    token: int

    @property
    def value(self) -> str:
        return f"{self.cycle_id}:{self.token}"

    @classmethod
    def parse(cls, raw: bytes | str) -> Holder:
        text = raw.decode() if isinstance(raw, bytes) else raw
        cycle_id, _, token = text.rpartition(":")
        return cls(cycle_id, int(token))


class CycleLock:
    """One cycle at a time; every write on a cycle's behalf is fenced by its token."""

    def __init__(self, client: redis.Redis, lock_key: str, fence_key: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("lock ttl must be positive")
        self.client = client
        self.lock_key = lock_key
        self.fence_key = fence_key
        self.ttl_ms = int(ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._fenced = client.register_script(_FENCED_HSET)
        self._release = client.register_script(_RELEASE)

    def acquire(self, cycle_id: str) -> int | None:
        """Take the lock for `cycle_id`; its fencing token, or None if another cycle holds it."""
        if ":" in cycle_id:
            raise ValueError("cycle id must not contain ':'")
        token, _ = self._acquire(keys=[self.lock_key, self.fence_key], args=[cycle_id, self.ttl_ms])
        return int(token) or None

    def holder(self) -> Holder | None:
        raw = self.client.get(self.lock_key)
        return Holder.parse(raw) if raw else None

    def renew(self, holder: Holder) -> bool:
        """Extend the lock if `holder` still owns it (or reclaim it if it lapsed unclaimed)."""
        res = self._renew(
            keys=[self.lock_key, self.fence_key],
            args=[holder.value, self.ttl_ms, str(holder.token)],
        )
        return int(res) > 0

    def fenced_write(
        self,
        holder: Holder,
        writes: dict[str, dict[str, Any]],
        require: dict[str, str] | None = None,
    ) -> str:
        """HSET each `{key: {field: value}}` atomically, only if `holder` still owns the lock and
        every `require` key holds its value. "ok", "lock_lost" or "requirement_failed"."""
        req = require or {}
        keys = [self.lock_key, *req]
        args: list[Any] = [holder.value, len(req), *req.values()]
        for key, mapping in writes.items():
            keys.append(key)
            args.append(len(mapping))
            for field, value in mapping.items():
                args.extend([field, value])
        res = int(self._fenced(keys=keys, args=args))
        return {1: "ok", 0: "lock_lost"}.get(res, "requirement_failed")

    def fenced_hset(self, holder: Holder, writes: dict[str, dict[str, Any]]) -> bool:
        """`fenced_write` without requirements: True if written."""
        return self.fenced_write(holder, writes) == "ok"

    def release(self, holder: Holder) -> bool:
        return bool(int(self._release(keys=[self.lock_key], args=[holder.value])))


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class BeatLock:
    """Single active beat: SET NX with a TTL, renewed by its holder, released on exit."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float, owner: str | None = None):
        if ttl_s <= 0:
            raise ValueError("beat lock ttl must be positive")
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.owner = owner or _owner_id()
        self._release = client.register_script(_RELEASE)
        self._extend = client.register_script(_EXTEND)

    def acquire(self) -> bool:
        """Take the lock (True), or keep it if this owner already holds it."""
        if self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            return True
        return self.renew()

    def renew(self) -> bool:
        """Extend the lock; False if it was lost (expired and taken, or deleted)."""
        return bool(int(self._extend(keys=[self.key], args=[self.owner, self.ttl_ms])))

    def holder(self) -> str | None:
        raw = self.client.get(self.key)
        return raw.decode() if raw else None

    def release(self) -> bool:
        return bool(int(self._release(keys=[self.key], args=[self.owner])))

    def wait_acquire(self, poll_s: float, timeout_s: float | None = None) -> bool:
        """Block until this process holds the lock (hot standby); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True


# KEYS: 1 lease. ARGV: 1 owner, 2 ttl ms. Extend if ours, take if free; 0 if another owns it.
_LEASE_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
"""


class Lease:
    """One execution of a cycle step at a time: SET NX with a short TTL, renewed by the
    execution's heartbeat. An expired lease means its execution died (its worker was killed);
    a renewal that finds another owner means another execution took the step over, and this one
    must stop without touching the cycle."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.owner = uuid.uuid4().hex
        self._renew = client.register_script(_LEASE_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        return bool(int(self._renew(keys=[self.key], args=[self.owner, self.ttl_ms])))

    def release(self) -> bool:
        return bool(int(self._release(keys=[self.key], args=[self.owner])))
