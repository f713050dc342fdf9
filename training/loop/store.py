"""Cycle records, flags and pointers in Redis, and the errors a cycle ends with.

Key names: docs/REDIS-KEYS.md (`feedback.keys.LoopKeys`). The store reads feedback's counters
through feedback's own public read (`feedback.store.read_counters`), never its hash directly.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis

from instructloop.feedback.keys import DEFAULT_KEY_PREFIX, LoopKeys
from instructloop.feedback.store import read_counters
from instructloop.training.loop.config import STEPS, CycleConfig
from instructloop.training.loop.locks import CycleLock, Holder

TERMINAL = frozenset({"promoted", "rejected", "failed", "cancelled"})
RANKING_KINDS = ("comparison", "ranking")
"""The feedback kinds a reward model trains on (a comparison is a ranking of two)."""


class CycleError(Exception):
    """A cycle step failed; the message is the reason recorded in the cycle record."""


class Cancelled(Exception):
    """The cycle was cancelled while the step ran."""


class LeaseLost(Exception):
    """Another execution took this step over (this one was presumed dead): stop quietly."""


class CycleBusy(Exception):
    """Another cycle holds the lock."""

    def __init__(self, holder: Holder | None) -> None:
        self.holder = holder
        who = f"cycle {holder.cycle_id} (token {holder.token})" if holder else "another cycle"
        super().__init__(f"{who} is running; only one cycle runs at a time")


def text(v: Any) -> str:
    """A Redis reply as str, from a client with or without decode_responses."""
    return v.decode() if isinstance(v, bytes) else str(v)


def encode(v: Any) -> str | int | float:
    """A value for a hash field: numbers and strings as they are, anything else as JSON."""
    if isinstance(v, str | int | float) and not isinstance(v, bool):
        return v
    return json.dumps(v)


def new_cycle_id() -> str:
    return f"cyc-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def redis_client(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)
    try:
        yield client
    finally:
        client.close()


# Sets the cycle's terminal state once: KEYS 1 cycle hash; ARGV field/value pairs.
# Returns 1 if this call ended the cycle, 0 if it had already ended.
_FINALIZE = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == 'promoted' or s == 'rejected' or s == 'failed' or s == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


@dataclass
class CycleRecord:
    """A cycle as `cycle status` shows it."""

    id: str
    state: str
    trigger: str
    token: int
    created_at: float
    finished_at: float | None
    reason: str
    failed_step: str
    parent_version: str
    candidate_version: str
    current_step: str
    config: dict[str, Any]
    steps: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    task_ids: list[str]

    @property
    def holder(self) -> Holder:
        return Holder(self.id, self.token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> CycleRecord:
        steps = {k[5:]: json.loads(v) for k, v in raw.items() if k.startswith("step:")}
        outputs = {k[4:]: json.loads(v) for k, v in raw.items() if k.startswith("out:")}
        return cls(
            id=raw["id"],
            state=raw.get("state", "queued"),
            trigger=raw.get("trigger", ""),
            token=int(raw.get("token", 0)),
            created_at=float(raw.get("created_at", 0)),
            finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None,
            reason=raw.get("reason", ""),
            failed_step=raw.get("failed_step", ""),
            parent_version=raw.get("parent_version", ""),
            candidate_version=raw.get("candidate_version", ""),
            current_step=raw.get("current_step", ""),
            config=json.loads(raw.get("config", "{}")),
            steps={s: steps[s] for s in STEPS if s in steps},
            outputs={s: outputs[s] for s in STEPS if s in outputs},
            task_ids=json.loads(raw.get("task_ids", "[]")),
        )


class CycleStore:
    """Cycle records, flags and pointers in Redis (decode_responses clients and bytes both work)."""

    def __init__(
        self, client: redis.Redis, prefix: str = DEFAULT_KEY_PREFIX, lock_ttl_s: float = 3600
    ) -> None:
        self.client = client
        self.keys = LoopKeys(prefix)
        self.prefix = prefix
        self.lock = CycleLock(client, self.keys.lock, self.keys.fence, lock_ttl_s)
        self._finalize = client.register_script(_FINALIZE)

    # -- records
    def create(self, cycle_id: str, token: int, trigger: str, cfg: CycleConfig) -> None:
        now = time.time()
        self.client.hset(
            self.keys.cycle(cycle_id),
            mapping={
                "id": cycle_id,
                "state": "queued",
                "trigger": trigger,
                "token": token,
                "created_at": now,
                "config": json.dumps(cfg.to_dict()),
                "task_ids": "[]",
            },
        )
        self.client.zadd(self.keys.cycles, {cycle_id: now})
        self.client.set(self.keys.last_started, now)

    def get(self, cycle_id: str) -> CycleRecord | None:
        raw = {text(k): text(v) for k, v in self.client.hgetall(self.keys.cycle(cycle_id)).items()}
        return CycleRecord.from_hash(raw) if raw else None

    def recent(self, n: int = 10) -> list[str]:
        return [text(x) for x in self.client.zrevrange(self.keys.cycles, 0, n - 1)]

    def latest(self) -> CycleRecord | None:
        ids = self.recent(1)
        return self.get(ids[0]) if ids else None

    def set_fields(self, cycle_id: str, **values: Any) -> None:
        self.client.hset(
            self.keys.cycle(cycle_id), mapping={k: encode(v) for k, v in values.items()}
        )

    def step_state(self, cycle_id: str, step: str) -> dict[str, Any]:
        raw = self.client.hget(self.keys.cycle(cycle_id), f"step:{step}")
        return json.loads(raw) if raw else {}

    def set_step_state(self, cycle_id: str, step: str, state: dict[str, Any]) -> None:
        self.client.hset(self.keys.cycle(cycle_id), f"step:{step}", json.dumps(state))

    def output(self, cycle_id: str, step: str) -> dict[str, Any] | None:
        raw = self.client.hget(self.keys.cycle(cycle_id), f"out:{step}")
        return json.loads(raw) if raw else None

    def finalize(self, cycle_id: str, state: str, reason: str = "", **extra: Any) -> bool:
        """End the cycle (once): True if this call ended it."""
        assert state in TERMINAL
        values = {"state": state, "reason": reason, "finished_at": time.time(), "current_step": ""}
        values.update(extra)
        args: list[Any] = []
        for k, v in values.items():
            args.extend([k, encode(v)])
        return bool(int(self._finalize(keys=[self.keys.cycle(cycle_id)], args=args)))

    # -- flags and pointers
    def request_cancel(self, cycle_id: str) -> None:
        self.client.set(self.keys.cancel(cycle_id), time.time())

    def cancel_requested(self, cycle_id: str) -> bool:
        return bool(self.client.exists(self.keys.cancel(cycle_id)))

    def last_reward_model(self) -> dict[str, str]:
        return {text(k): text(v) for k, v in self.client.hgetall(self.keys.reward_model).items()}

    def feedback_count(self) -> int:
        """Rankings + comparisons stored so far (the feedback store's counters)."""
        stats = self.feedback_stats()
        return sum(stats.get(f"feedback:{k}", 0) for k in RANKING_KINDS)

    def feedback_stats(self) -> dict[str, int]:
        """The feedback store's counters: completions, feedback:<kind>."""
        return read_counters(self.client, self.prefix)

    def new_feedback_since_last_rm(self) -> int:
        baseline = int(self.last_reward_model().get("feedback_count", 0) or 0)
        return max(0, self.feedback_count() - baseline)
