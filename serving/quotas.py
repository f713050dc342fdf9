"""Per-principal quotas on completions: requests started and tokens generated per minute.

Counters live in Redis, so one principal's limit holds across every replica (several processes,
often several machines), which is what a client expects of "N a minute". Each is a sliding
window counter (the current fixed window's count plus the previous one's, weighted by how much
of it still lies within the last minute): it smooths the burst a fixed window allows at its
edges, for one more key read in the same round trip. Admission is one Lua script (EVALSHA: one
round trip, atomic, so replicas cannot both admit the last request), and refused requests do not
count. Tokens are charged when a request ends, off the request's path (a background INCRBY), so a
request is admitted while its principal is under the token limit and requests in flight can
overshoot it by what they generate (as providers that count tokens after generation do).
With no limit configured nothing here touches Redis. When Redis cannot be reached the request is
let through (and counted in a metric): the quota protects capacity, and refusing every request
while the store is down would turn a Redis fault into an outage of completions that do not log.

Transport-neutral: the gRPC guard (serving/errors.py) calls `admit_completion` before a
completion handler and binds the caller (`bind`) for the request; another transport (the HTTP
API) does the same: `principal = auth.principal(header)`, `await quotas.admit_completion(p)`
(QuotaExceeded -> 429 with Retry-After), `quotas.bind(p)`. The completion core then calls
`charge_generated(tokens)` when a request ends and records `current_principal()`.

Feedback per principal is limited by the feedback store itself (feedback/store.py), in the same
script that stores a record, so only stored feedback counts, as for its per-user limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from instructloop.feedback.keys import Keys
from instructloop.serving.auth import ANONYMOUS
from instructloop.serving.metrics import ServerMetrics

log = logging.getLogger("instructloop.serving")

KINDS = ("requests", "tokens")
"""What a completion quota counts, as named in QuotaExceeded.kind and the metric's label."""

# KEYS: 1 requests now, 2 requests in the previous window, 3 tokens now, 4 tokens previous
# ARGV: 1 request limit, 2 token limit (0 = none), 3 the previous window's weight (0..1),
#       4 the window's TTL in seconds
# Returns {'OK'} or {kind, count now, count previous}.
ADMIT_LUA = """
local rl, tl, w = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function over(cur_key, prev_key, limit, kind)
  local cur = tonumber(redis.call('GET', cur_key) or '0')
  local prev = tonumber(redis.call('GET', prev_key) or '0')
  if prev * w + cur >= limit then return {kind, cur, prev} end
  return nil
end
if rl > 0 then
  local r = over(KEYS[1], KEYS[2], rl, 'requests')
  if r then return r end
end
if tl > 0 then
  local r = over(KEYS[3], KEYS[4], tl, 'tokens')
  if r then return r end
end
if rl > 0 then
  if redis.call('INCR', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
end
return {'OK'}
"""


class QuotaExceeded(Exception):
    """A principal is over one of its quotas. `retry_after_s`: when the sliding window will
    have room again, if nothing else is admitted meanwhile."""

    def __init__(self, kind: str, principal: str, limit: int, retry_after_s: float) -> None:
        what = "completion requests" if kind == "requests" else "generated tokens"
        who = f"principal {principal!r}" if principal else "this server's callers"
        super().__init__(
            f"{who} is over its quota of {limit} {what} per minute; "
            f"retry in {math.ceil(retry_after_s)} s"
        )
        self.kind = kind
        self.principal = principal
        self.limit = limit
        self.retry_after_s = retry_after_s


def retry_after(cur: float, prev: float, limit: int, elapsed: float, window: float) -> float:
    """Seconds until the sliding estimate `prev * (1 - elapsed / window) + cur` falls below
    `limit`, counting nothing new; at least 1 (a retry hint of 0 invites a busy loop)."""
    if cur >= limit:
        # Only the next window helps: there, this window's count is the weighted previous one.
        wait = (window - elapsed) + (window * (1 - limit / cur) if cur > 0 else 0.0)
    elif prev > 0:
        wait = window * (1 - (limit - cur) / prev) - elapsed
    else:
        wait = 0.0
    return max(1.0, wait)


@dataclass(frozen=True)
class QuotaLimits:
    """Per principal and minute; 0 = no limit (ServerConfig.quota_*)."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    window_s: int = 60


class Quotas:
    """Per-principal completion quotas, counted in Redis (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        limits: QuotaLimits,
        metrics: ServerMetrics,
    ) -> None:
        self.client = client
        self.keys = keys
        self.limits = limits
        self.metrics = metrics
        self._admit = client.register_script(ADMIT_LUA)
        self._charges: set[asyncio.Task[None]] = set()
        self._last_warning = -math.inf
        self._callers: dict[str, Caller] = {}
        self.clock: Callable[[], float] = time.time
        """Wall-clock seconds that place a request in its window (replicas' clocks agree to
        well under a window); tests pin it away from a window's edge."""

    @property
    def enabled(self) -> bool:
        """Whether completions are limited at all (else `admit_completion` is never needed)."""
        return bool(self.limits.requests_per_minute or self.limits.tokens_per_minute)

    def _slots(self, now: float) -> tuple[int, float, float]:
        """(current window index, seconds into it, the previous window's weight)."""
        w = self.limits.window_s
        slot = int(now // w)
        elapsed = now - slot * w
        return slot, elapsed, 1.0 - elapsed / w

    async def admit_completion(self, principal: str) -> None:
        """Count one completion request of `principal`, or raise QuotaExceeded (and count the
        refusal in `instructloop_quota_refusals_total`)."""
        lim = self.limits
        if not self.enabled:
            return
        slot, elapsed, weight = self._slots(self.clock())
        k = self.keys
        try:
            res = await self._admit(
                keys=[
                    k.quota("requests", principal, slot),
                    k.quota("requests", principal, slot - 1),
                    k.quota("tokens", principal, slot),
                    k.quota("tokens", principal, slot - 1),
                ],
                args=[
                    lim.requests_per_minute,
                    lim.tokens_per_minute,
                    repr(weight),
                    2 * lim.window_s,
                ],
            )
        except (RedisError, OSError) as e:
            self._fail_open("admitting a completion", e)
            return
        kind = res[0].decode() if isinstance(res[0], bytes) else str(res[0])
        if kind == "OK":
            return
        limit = lim.requests_per_minute if kind == "requests" else lim.tokens_per_minute
        self.metrics.quota_refusals.labels(principal, kind).inc()
        raise QuotaExceeded(
            kind,
            principal,
            limit,
            retry_after(float(res[1]), float(res[2]), limit, elapsed, lim.window_s),
        )

    def charge_tokens(self, principal: str, tokens: int) -> None:
        """Add `tokens` generated for `principal` to its window, in the background (the
        response does not wait for it)."""
        if not self.limits.tokens_per_minute or tokens <= 0:
            return
        task = asyncio.get_running_loop().create_task(self._charge(principal, tokens))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def _charge(self, principal: str, tokens: int) -> None:
        key = self.keys.quota("tokens", principal, self._slots(self.clock())[0])
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.incrby(key, tokens)
                pipe.expire(key, 2 * self.limits.window_s)
                await pipe.execute()
        except (RedisError, OSError) as e:
            self._fail_open("charging generated tokens", e)

    async def settle(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for the token charges under way: on stop, and in tests."""
        if self._charges:
            await asyncio.wait(set(self._charges), timeout=timeout_s)

    def _fail_open(self, what: str, e: BaseException) -> None:
        self.metrics.quota_errors.inc()
        now = time.monotonic()
        if now - self._last_warning >= 60.0:  # one line a minute, not one per request
            self._last_warning = now
            log.warning("quotas: %s failed (%s); letting requests through meanwhile", what, e)

    def caller(self, principal: str) -> Caller:
        """The Caller of `principal` under these quotas (one object per principal, and
        principals are the operator's configured few)."""
        c = self._callers.get(principal)
        if c is None:
            c = self._callers[principal] = Caller(principal, self)
        return c

    def bind(self, principal: str) -> None:
        """Make `principal` the caller of the request running in this task (and these quotas
        the ones its generated tokens are charged to)."""
        bind(self.caller(principal))


@dataclass(frozen=True, slots=True)
class Caller:
    """Who the request running in this task is for (set once per request by the transport)."""

    principal: str
    quotas: Quotas | None = None


_CALLER: ContextVar[Caller | None] = ContextVar("instructloop_caller", default=None)
"""Task-local: grpc.aio runs each RPC in a task of its own (so does an ASGI server each HTTP
request), and a value set in it is seen by everything that request awaits, and by no other
request."""


def bind(caller: Caller) -> None:
    """Make `caller` the caller of the request running in this task."""
    _CALLER.set(caller)


def current_principal() -> str:
    """The principal of the request running in this task ("" when none was bound)."""
    caller = _CALLER.get()
    return ANONYMOUS if caller is None else caller.principal


def charge_generated(tokens: int) -> None:
    """Charge tokens generated for the request running in this task to its principal's quota
    (a no-op without a token quota)."""
    caller = _CALLER.get()
    if caller is not None and caller.quotas is not None:
        caller.quotas.charge_tokens(caller.principal, tokens)
