"""The async feedback store: completion log and feedback records in Redis (`redis.asyncio`).

Every write is ONE Lua script, sent as EVALSHA (one round trip), so Redis runs it atomically:
a record is either wholly there (with its indexes, its stream entry and its counters) or not at
all. A write returns only after Redis has answered; with `appendonly yes` and
`appendfsync always` (as `instructloop up` runs it) that answer comes after the fsync.
Writes go out on a connection of their own (feedback/write_channel.py; redis://, rediss:// and
unix:// alike): writes issued at the same moment by concurrent callers share one pipelined batch
(one socket write and read, one fsync); each is still its own script. Reads use redis-py's
connection pool.

Order of checks in a feedback write (the first failing one answers, nothing is stored):
1. the shape of the request (in Python): InvalidFeedback;
2. idempotency (in the script): the same (principal, user_id, idempotency_key) with the same
   judgement returns the first ack with duplicate=True; with another judgement,
   IdempotencyConflict. A replay is answered even when the user is over the rate limit;
3. the referenced ids (in the script): unknown or expired -> NotFound; ids of different
   completions -> InvalidFeedback;
4. the rate limits (in the script), the user's (within its principal) and the principal's:
   RateLimited. Only stored feedback counts towards them;
5. the write: record, idempotency entry, feedback stream entry, counters, rate counters.

Retries: a connection error is retried (config.retries) with the SAME feedback id, and the
script recognises its own earlier write by that id, so a retried write is never stored twice and
is acknowledged as new (duplicate=False). Connection errors that outlast the retries, timeouts
and other Redis failures raise StoreUnavailable: the caller was not acknowledged. A broken
connection is dropped and a new one opened on the next write (and by redis-py for reads), so the
store works again as soon as Redis is back.

Key layout: feedback/keys.py. The scripts use keys they derive from stored ids (response ->
completion), so the store needs a single Redis (not Redis Cluster).
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import (
    IdempotencyConflict,
    InvalidFeedback,
    InvalidRecord,
    NotFound,
    RateLimited,
    StoreUnavailable,
)
from instructloop.feedback.keys import Keys
from instructloop.feedback.records import RATING_SCALES, CompletionRecord, FeedbackRecord
from instructloop.feedback.scripts import (
    FEEDBACK_SHA,
    LOG_COMPLETION_LUA,
    LOG_SHA,
    SUBMIT_FEEDBACK_LUA,
)
from instructloop.feedback.write_channel import (
    Endpoint,
    PipelineChannel,
    ScriptChannel,
    Unsupported,
)

_UNAVAILABLE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class Ack:
    """The acknowledgement of a stored (or replayed) judgement."""

    feedback_id: str
    duplicate: bool
    """True when an earlier submission with the same idempotency key is being acknowledged."""
    created_at: float
    """When the (first) submission was stored, Unix seconds."""
    completion_id: str = ""


def normalize_ranks(ranks: Sequence[int] | None, n: int) -> list[int]:
    """Check and complete the ranks of an n-way ranking (best first).

    Empty means a strict order 1..n. Otherwise: one rank per response, starting at 1,
    non-decreasing, dense (each step is 0 = tie with the previous, or 1). E.g. [1, 1, 2].
    """
    if not ranks:
        return list(range(1, n + 1))
    out = [int(r) for r in ranks]
    if len(out) != n:
        raise InvalidFeedback(
            f"ranks has {len(out)} entries for {n} ranked responses; give one rank per response "
            "or none for a strict order"
        )
    if out[0] != 1:
        raise InvalidFeedback(f"ranks must start at 1 (the best), got {out}")
    for prev, cur in itertools.pairwise(out):
        if cur < prev:
            raise InvalidFeedback(
                f"ranks must not decrease (responses are listed best first), got {out}"
            )
        if cur > prev + 1:
            raise InvalidFeedback(
                f"ranks must be dense (1, 2, 3, ... with equal ranks for ties), got {out}"
            )
    return out


class FeedbackStore:
    """Completion log and feedback records in Redis, for the gRPC server (asyncio)."""

    def __init__(self, client: aioredis.Redis, config: StoreConfig | None = None) -> None:
        """`client` must decode responses (decode_responses=True); prefer `from_url`."""
        self.client = client
        self.config = config or StoreConfig()
        self.keys = Keys(self.config.key_prefix)
        cfg = self.config
        # Constant script arguments, formatted once.
        self._ttl_cmpl = str(cfg.completion_ttl_s or 0)
        self._maxlen = str(cfg.stream_maxlen or 0)
        self._fb_settings = (
            f"{cfg.rate_limit_per_minute} {cfg.rate_limit_window_s} {cfg.feedback_ttl_s or 0} "
            f"{cfg.stream_maxlen or 0} {cfg.principal_rate_limit_per_minute} "
            f"{self.keys.response_prefix}"
        )
        self._fb_log = self.keys.feedback_log
        self._stats = self.keys.stats
        self._writes: ScriptChannel | PipelineChannel
        try:
            endpoint = Endpoint.from_pool(client.connection_pool)
        except Unsupported:  # a pool the fast channel cannot copy: redis-py's pipeline
            self._writes = PipelineChannel(
                client, max_batch=cfg.write_batch_max, in_flight=cfg.write_batches_in_flight
            )
        else:
            self._writes = ScriptChannel(
                endpoint,
                max_batch=cfg.write_batch_max,
                in_flight=cfg.write_batches_in_flight,
                timeout_s=cfg.socket_timeout_s,
                connect_timeout_s=cfg.socket_connect_timeout_s,
                retries=cfg.retries,
                backoff=ExponentialBackoff(cap=cfg.retry_backoff_cap_s, base=0.01),
            )

    @classmethod
    def from_url(cls, url: str, config: StoreConfig | None = None) -> FeedbackStore:
        config = config or StoreConfig()
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=config.max_connections,
            timeout=config.socket_timeout_s,
            decode_responses=True,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.socket_connect_timeout_s,
            retry=Retry(
                ExponentialBackoff(cap=config.retry_backoff_cap_s, base=0.01), config.retries
            ),
        )
        return cls(aioredis.Redis(connection_pool=pool), config)

    async def close(self) -> None:
        await self._writes.close()
        await self.client.aclose(close_connection_pool=True)

    async def ping(self) -> bool:
        """True when Redis answers; never raises."""
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def __aenter__(self) -> FeedbackStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing -----------------------------------------------------------------------------

    async def _run(self, sha: str, script: str, *numkeys_keys_args: Any) -> Any:
        """Run a script (EVALSHA, batched with concurrent writes); map failures to our errors."""
        try:
            return await self._writes.call(sha, script, *numkeys_keys_args)
        except _UNAVAILABLE_ERRORS as e:
            raise StoreUnavailable(f"Redis is unavailable: {e}; nothing was stored") from e
        except RedisError as e:
            # e.g. OOM, read-only replica, a busy script: a fault of the store, not of the
            # request; the caller was not acknowledged.
            raise StoreUnavailable(f"Redis refused the write: {e}; nothing was stored") from e

    async def _read(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"Redis is unavailable: {e}") from e

    def _check_id(self, name: str, value: str, *, required: bool = True) -> None:
        if not isinstance(value, str):
            raise InvalidFeedback(f"{name} must be a string")
        if required and not value:
            raise InvalidFeedback(f"{name} is required")
        if len(value) > self.config.max_id_chars:
            raise InvalidFeedback(
                f"{name} is {len(value)} characters long; at most {self.config.max_id_chars}"
            )

    async def _submit(
        self,
        kind: str,
        user_id: str,
        idempotency_key: str | None,
        data: str,
        refs: list[str],
        principal: str,
    ) -> Ack:
        self._check_id("user_id", user_id)
        ikey = idempotency_key or ""
        self._check_id("idempotency_key", ikey, required=False)
        self._check_id("principal", principal, required=False)
        fid = "fb-" + uuid.uuid4().hex
        now = time.time()
        keys = self.keys
        fb_key = keys.feedback(fid)
        window = self.config.rate_limit_window_s
        slot = int(now // window)
        res = await self._run(
            FEEDBACK_SHA,
            SUBMIT_FEEDBACK_LUA,
            6 + len(refs),
            fb_key,
            keys.idempotency(user_id, ikey, principal) if ikey else fb_key,
            keys.rate(user_id, slot, principal),
            self._fb_log,
            self._stats,
            *refs,
            keys.principal_rate(principal, slot),
            self._fb_settings,
            json.dumps([kind, fid, user_id, ikey, repr(now), principal]),
            data,
        )
        status = res[0]
        if status == "OK":
            return Ack(fid, False, now, res[1])
        if status == "DUP":
            # Our own retried write (same feedback id) is new to the caller, not a duplicate.
            return Ack(res[1], res[1] != fid, float(res[2]), res[3])
        if status == "NOTFOUND":
            raise NotFound(res[1])
        if status == "INVALID":
            raise InvalidFeedback(res[1])
        if status == "CONFLICT":
            raise IdempotencyConflict(
                f"idempotency key {ikey!r} of user {user_id!r} was already used for a different "
                f"judgement (feedback {res[1]}); use a new key for new feedback",
                feedback_id=res[1],
            )
        if status in ("RATE", "PRATE"):
            retry_after = window - (now % window)
            if status == "RATE":
                who, scope, limit = f"user {user_id!r}", "user", self.config.rate_limit_per_minute
            else:
                who, scope = f"principal {principal!r}", "principal"
                limit = self.config.principal_rate_limit_per_minute
            raise RateLimited(
                f"{who} has submitted {res[1]} feedback records in this {window} s window "
                f"(limit {limit}); retry in {retry_after:.0f} s",
                retry_after_s=retry_after,
                scope=scope,
                principal=principal,
            )
        raise StoreUnavailable(f"unexpected answer from the feedback script: {res!r}")

    # -- feedback -----------------------------------------------------------------------------

    async def submit_ranking(
        self,
        *,
        user_id: str,
        idempotency_key: str | None,
        completion_id: str,
        ranked_response_ids: Sequence[str],
        ranks: Sequence[int] | None = None,
        principal: str = "",
    ) -> Ack:
        """Store a K-way ranking of responses of `completion_id`, best first.

        `ranks` (optional): dense ranks per response, equal ranks tie (see normalize_ranks).
        `principal` (every submit_*): the caller's principal, "" without authentication; the
        user is a label within it (idempotency keys and the user's rate limit are its own).
        """
        self._check_id("completion_id", completion_id)
        ids = list(ranked_response_ids)
        n = len(ids)
        if n < 2:
            raise InvalidFeedback(f"a ranking needs at least 2 response ids, got {n}")
        if n > self.config.max_ranking_size:
            raise InvalidFeedback(
                f"a ranking holds at most {self.config.max_ranking_size} responses, got {n}"
            )
        for rid in ids:
            self._check_id("ranked_response_ids entry", rid)
        if len(set(ids)) != n:
            seen: set[str] = set()
            for rid in ids:
                if rid in seen:
                    raise InvalidFeedback(f"response {rid} appears more than once in the ranking")
                seen.add(rid)
        rank_list = normalize_ranks(ranks, n)
        data = json.dumps(
            {"completion_id": completion_id, "response_ids": ids, "ranks": rank_list},
            separators=(",", ":"),
        )
        return await self._submit(
            "ranking",
            user_id,
            idempotency_key,
            data,
            [self.keys.completion(completion_id)],
            principal,
        )

    async def submit_comparison(
        self,
        *,
        user_id: str,
        idempotency_key: str | None,
        chosen_response_id: str,
        rejected_response_id: str,
        tie: bool = False,
        principal: str = "",
    ) -> Ack:
        """Store a pairwise judgement of two responses of one completion (or a tie)."""
        self._check_id("chosen_response_id", chosen_response_id)
        self._check_id("rejected_response_id", rejected_response_id)
        if chosen_response_id == rejected_response_id:
            raise InvalidFeedback(
                f"a comparison needs two different responses, got {chosen_response_id} twice"
            )
        data = json.dumps(
            {
                "chosen_response_id": chosen_response_id,
                "rejected_response_id": rejected_response_id,
                "tie": bool(tie),
            },
            separators=(",", ":"),
        )
        return await self._submit(
            "comparison",
            user_id,
            idempotency_key,
            data,
            [self.keys.response(chosen_response_id), self.keys.response(rejected_response_id)],
            principal,
        )

    async def submit_rating(
        self,
        *,
        user_id: str,
        idempotency_key: str | None,
        response_id: str,
        scale: str,
        score: int,
        principal: str = "",
    ) -> Ack:
        """Store a rating: scale "thumb" with score +1/-1, or "likert7" with score 1..7."""
        self._check_id("response_id", response_id)
        if scale not in RATING_SCALES:
            raise InvalidFeedback(f"unknown rating scale {scale!r}; use 'thumb' or 'likert7'")
        if isinstance(score, bool) or not isinstance(score, int):
            raise InvalidFeedback(f"score must be an integer, got {score!r}")
        if scale == "thumb" and score not in (1, -1):
            raise InvalidFeedback(f"a thumb rating is +1 or -1, got {score}")
        if scale == "likert7" and not 1 <= score <= 7:
            raise InvalidFeedback(f"a Likert rating is 1 to 7, got {score}")
        data = json.dumps(
            {"response_id": response_id, "scale": scale, "score": score}, separators=(",", ":")
        )
        return await self._submit(
            "rating",
            user_id,
            idempotency_key,
            data,
            [self.keys.response(response_id)],
            principal,
        )

    # -- completions --------------------------------------------------------------------------

    def check_metadata(self, metadata: dict[str, str]) -> None:
        """Raise InvalidRecord when a completion's metadata map is over the limits."""
        cfg = self.config
        if len(metadata) > cfg.max_metadata_entries:
            raise InvalidRecord(
                f"metadata has {len(metadata)} entries; at most {cfg.max_metadata_entries}"
            )
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidRecord("metadata keys and values must be strings")
            if not k:
                raise InvalidRecord("metadata keys must not be empty")
            if len(k) > cfg.max_metadata_key_chars:
                raise InvalidRecord(
                    f"metadata key {k[:32]!r}... is {len(k)} characters; "
                    f"at most {cfg.max_metadata_key_chars}"
                )
            if len(v) > cfg.max_metadata_value_chars:
                raise InvalidRecord(
                    f"metadata value of {k!r} is {len(v)} characters; "
                    f"at most {cfg.max_metadata_value_chars}"
                )

    def check_completion(self, rec: CompletionRecord) -> None:
        """Raise InvalidRecord when `rec` cannot be stored as it is."""
        limit = self.config.max_id_chars
        if not rec.completion_id or len(rec.completion_id) > limit:
            raise InvalidRecord(f"bad completion_id {rec.completion_id!r}")
        if not rec.model_version:
            raise InvalidRecord("a completion record needs the model_version that produced it")
        if len(rec.user_id) > limit:
            raise InvalidRecord(f"user_id is {len(rec.user_id)} characters; at most {limit}")
        if (rec.prompt is None) == (rec.messages is None):
            raise InvalidRecord("a completion record holds exactly one of prompt and messages")
        if not rec.responses:
            raise InvalidRecord("a completion record needs at least one response")
        ids = [r.response_id for r in rec.responses]
        if len(set(ids)) != len(ids):
            raise InvalidRecord("response ids within a completion must be unique")
        for rid in ids:
            if not rid or len(rid) > limit:
                raise InvalidRecord(f"bad response_id {rid!r}")
        self.check_metadata(rec.metadata)

    async def log_completion(self, rec: CompletionRecord) -> None:
        """Store a completion record with its response index and log entry, atomically.

        Logging the same record again (a retry) is a no-op; another record under a taken
        completion or response id raises InvalidRecord.
        """
        self.check_completion(rec)
        keys = self.keys
        ids = [r.response_id for r in rec.responses]
        res = await self._run(
            LOG_SHA,
            LOG_COMPLETION_LUA,
            3 + len(ids),
            keys.completion(rec.completion_id),
            keys.completion_log,
            self._stats,
            *(keys.response(r) for r in ids),
            rec.completion_id,
            rec.to_json(),
            self._ttl_cmpl,
            self._maxlen,
            *ids,
        )
        status = res[0]
        if status in ("OK", "DUP"):
            return
        if status == "CONFLICT":
            raise InvalidRecord(
                f"completion {rec.completion_id} is already logged with different content"
            )
        if status == "RESP_TAKEN":
            raise InvalidRecord(f"response id {res[1]} already belongs to completion {res[2]}")
        raise StoreUnavailable(f"unexpected answer from the completion script: {res!r}")

    # -- reads --------------------------------------------------------------------------------

    async def get_completion(self, completion_id: str) -> CompletionRecord | None:
        raw = await self._read(self.client.hget(self.keys.completion(completion_id), "record"))
        return None if raw is None else CompletionRecord.from_json(raw)

    async def completion_of_response(self, response_id: str) -> str | None:
        return await self._read(self.client.get(self.keys.response(response_id)))

    async def get_feedback(self, feedback_id: str) -> FeedbackRecord | None:
        h = await self._read(self.client.hgetall(self.keys.feedback(feedback_id)))
        return FeedbackRecord.from_redis_hash(h) if h else None

    async def counters(self) -> dict[str, int]:
        """Counters: `completions` and `feedback:<kind>` (each record counted once)."""
        h = await self._read(self.client.hgetall(self._stats))
        return {k: int(v) for k, v in h.items()}


def read_counters(client: redis.Redis, key_prefix: str) -> dict[str, int]:
    """The store's counters (`completions`, `feedback:<kind>`) over a sync client: the training
    loop's triggers and `instructloop status` read them without knowing where they are kept."""
    raw = client.hgetall(Keys(key_prefix).stats)
    return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
