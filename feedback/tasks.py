"""The labelling task queue: completions with several responses, handed to labellers one at a
time to rank (InstructGPT's labelling interface, §3.4 and appendix B).

A task is one logged completion with at least two responses; its id is the completion id.
Tasks are made lazily from the completion log (a cursor, feedback/task_scripts.py's `ingest`)
whenever the queue is used, so the completion write path is unchanged and a completion logged
by any replica becomes a task exactly once.

- `next_task`: the oldest task this labeller has neither labelled nor skipped, leased to them
  for `lease_s` (no other labeller gets it meanwhile; a lapsed lease puts it back in its place).
  A labeller holds one task at a time: asking again returns the same lease.
- `submit`: a ranking of every candidate (ties by equal ranks), an optional 1-7 rating of the
  top response and an optional comment. The ranking and the rating are ordinary feedback
  records, written by the same `FeedbackStore.submit_ranking` / `submit_rating` (validation,
  rate limits, idempotency, the export and the snapshot's per-user limits all apply as they
  are), with the idempotency key `label-<lease id>`: a double submit stores one ranking.
  Only then is the label counted on its task; a task with `labels_per_task` labels leaves the
  queue. The comment is kept with the label on the task record (`end:<lease>`), not in the
  feedback record, whose shape the training side reads.
- `skip`: back to the queue for the others, never again to this labeller.
- `flag` (unsafe, broken, other): the task leaves the queue and is counted by reason.
- `stats`: queue depth, labels in the last hour, and the agreement between labellers: over
  every pair of responses that two labellers of one task both ordered strictly, the share
  they ordered the same way (InstructGPT reports about 73% between labellers).

Submitting, skipping or flagging needs the lease (`task_id`, `lease_id`) held by the caller;
anything else is refused with NotLeased and stores nothing. A repeated call with an ended lease
answers as the first did.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from instructloop.feedback.errors import (
    FeedbackError,
    IdempotencyConflict,
    InvalidFeedback,
    NotFound,
    StoreUnavailable,
)
from instructloop.feedback.keys import Keys, LabelKeys
from instructloop.feedback.records import CompletionRecord
from instructloop.feedback.store import FeedbackStore, normalize_ranks
from instructloop.feedback.task_scripts import (
    COMPLETE_LUA,
    FLAG_LUA,
    NEXT_LUA,
    REFRESH_LUA,
    SKIP_LUA,
)

FLAG_REASONS = ("unsafe", "broken", "other")
"""Why a task is taken out of the queue: harmful content, a prompt or answers that cannot be
judged (truncated, garbled, empty), or anything else the comment explains."""

MIN_CANDIDATES = 2
"""A completion with fewer responses has nothing to rank."""

ANONYMOUS_LABELLER = "anonymous"
"""The labeller's name while authentication is off and the caller gives none."""


class NotLeased(FeedbackError):
    """The caller does not hold the task's lease (never had it, it lapsed, or it ended)."""

    grpc_code_name = "FAILED_PRECONDITION"


@dataclass
class TaskConfig:
    """How the labelling queue hands out tasks."""

    lease_s: float = 600.0
    """How long a labeller holds a task before it goes back to the queue. Ten minutes is long
    enough to read a prompt and rank several answers, short enough that a closed tab does not
    keep a task from the others for long."""

    labels_per_task: int = 1
    """Labels a task needs before it leaves the queue (R). 1 labels the most completions; 2 or
    more gives every task several labellers' rankings and the agreement between them."""

    max_comment_chars: int = 2000
    """Longest comment kept with a label or a flag (a few paragraphs; the task record is read
    whole)."""

    ingest_batch: int = 1000
    """Completion log entries turned into tasks per script call (bounds one call's time)."""

    scan_max: int = 2000
    """Queue entries one `next_task` call looks through for a task this labeller has not seen
    (bounds one call's time when a labeller has labelled many tasks still waiting for others)."""

    recent_window_s: int = 86400
    """How long label times are kept for `labels_last_hour` (a day, for a longer view later)."""

    def __post_init__(self) -> None:
        if self.lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {self.lease_s}")
        if self.labels_per_task < 1:
            raise ValueError(f"labels_per_task must be at least 1, got {self.labels_per_task}")
        if self.max_comment_chars < 0:
            raise ValueError("max_comment_chars must not be negative")
        if self.ingest_batch < 1 or self.scan_max < 1:
            raise ValueError("ingest_batch and scan_max must be at least 1")


@dataclass(frozen=True, slots=True)
class Labeller:
    """Who labels: the caller's principal (the key's owner; "" with authentication off) and an
    optional name within it (one key shared by a team, each member named)."""

    principal: str
    name: str = ""

    @property
    def user_id(self) -> str:
        """The user id of the feedback records this labeller's labels become."""
        return self.name or self.principal or ANONYMOUS_LABELLER

    @property
    def id(self) -> str:
        """The labeller as the queue knows them (leases, seen sets, per-labeller figures)."""
        if self.principal and self.name and self.name != self.principal:
            return f"{self.principal}/{self.name}"
        return self.user_id


@dataclass(frozen=True, slots=True)
class Task:
    """A task leased to a labeller: the completion and its candidates in the order to show."""

    task_id: str
    lease_id: str
    lease_expires: float
    """Unix seconds."""
    completion: CompletionRecord
    order: list[str]
    """The response ids in the order shown: shuffled per lease, so that position says nothing
    about the sample index."""
    labels_done: int
    labels_needed: int


@dataclass(frozen=True, slots=True)
class LabelAck:
    """A stored label: the ranking's feedback id and, with a rating, the rating's."""

    feedback_id: str
    duplicate: bool
    created_at: float
    rating_feedback_id: str = ""
    labels_done: int = 0


@dataclass
class LabellerFigures:
    labels: int = 0
    pairs_judged: int = 0
    pairs_agreed: int = 0

    @property
    def agreement(self) -> float | None:
        return self.pairs_agreed / self.pairs_judged if self.pairs_judged else None


@dataclass
class QueueStats:
    available: int
    leased: int
    done: int
    flagged: int
    tasks: int
    labels: int
    labels_last_hour: int
    skips: int
    lapsed: int
    expired: int
    labels_per_task: int
    pairs_judged: int
    pairs_agreed: int
    flags_by_reason: dict[str, int] = field(default_factory=dict)
    labellers: dict[str, LabellerFigures] = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        """Pairwise agreement between labellers of the same tasks; None before any overlap."""
        return self.pairs_agreed / self.pairs_judged if self.pairs_judged else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "leased": self.leased,
            "done": self.done,
            "flagged": self.flagged,
            "tasks": self.tasks,
            "labels": self.labels,
            "labels_last_hour": self.labels_last_hour,
            "skips": self.skips,
            "lapsed": self.lapsed,
            "expired": self.expired,
            "labels_per_task": self.labels_per_task,
            "pairs_judged": self.pairs_judged,
            "agreement": self.agreement,
            "flags_by_reason": dict(self.flags_by_reason),
            "labellers": {
                name: {
                    "labels": f.labels,
                    "pairs_judged": f.pairs_judged,
                    "agreement": f.agreement,
                }
                for name, f in sorted(self.labellers.items())
            },
        }


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class TaskQueue:
    """The labelling queue over a FeedbackStore's Redis client (asyncio)."""

    def __init__(self, store: FeedbackStore, config: TaskConfig | None = None) -> None:
        self.store = store
        self.client = store.client
        self.config = config or TaskConfig()
        prefix = store.config.key_prefix
        self.keys = LabelKeys(prefix)
        self._feedback_keys = Keys(prefix)
        c = self.client
        self._refresh = c.register_script(REFRESH_LUA)
        self._next = c.register_script(NEXT_LUA)
        self._skip = c.register_script(SKIP_LUA)
        self._flag = c.register_script(FLAG_LUA)
        self._complete = c.register_script(COMPLETE_LUA)

    # -- plumbing -----------------------------------------------------------------------------

    def _settings(self, now_ms: int, **more: Any) -> str:
        return json.dumps(
            {
                "task_prefix": self.keys.task_prefix,
                "seen_prefix": self.keys.seen_prefix,
                "cmpl_prefix": self._feedback_keys.completion(""),
                "now": now_ms,
                **more,
            },
            separators=(",", ":"),
        )

    async def _call(self, script: Any, keys: list[str], settings: str) -> list[Any]:
        try:
            res = await script(keys=keys, args=[settings])
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"Redis is unavailable: {e}; nothing was changed") from e
        return [_text(x) if isinstance(x, bytes | str) else x for x in res]

    async def _read(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"Redis is unavailable: {e}") from e

    def _queue_keys(self) -> list[str]:
        k = self.keys
        return [
            k.cursor,
            k.seq,
            k.queue,
            k.leased,
            k.holders,
            k.stats,
            self._feedback_keys.completion_log,
        ]

    def _check_lease_args(self, who: Labeller, task_id: str, lease_id: str) -> None:
        limit = self.store.config.max_id_chars
        for name, value in (
            ("task_id", task_id),
            ("lease_id", lease_id),
            ("labeller", who.id),
        ):
            if not value:
                raise InvalidFeedback(f"{name} is required")
            if len(value) > limit:
                raise InvalidFeedback(f"{name} is {len(value)} characters long; at most {limit}")

    def _check_comment(self, comment: str) -> None:
        limit = self.config.max_comment_chars
        if len(comment) > limit:
            raise InvalidFeedback(
                f"the comment is {len(comment)} characters long; at most {limit} are kept"
            )

    def _refused(self, res: list[Any], task_id: str, lease_id: str) -> FeedbackError:
        """The error of a script's refusal."""
        what = res[0]
        if what == "NOTASK":
            return NotFound(f"task {task_id} is unknown")
        if what == "LAPSED":
            ago = time.time() - int(res[1]) / 1000
            return NotLeased(
                f"your lease {lease_id} on task {task_id} lapsed {ago:.0f} s ago; the task went "
                "back to the queue: ask for the next task"
            )
        if what == "NOTYOURS":
            return NotLeased(
                f"task {task_id} is not leased to you under lease {lease_id} (it is "
                f"{res[1]}); ask for the next task"
            )
        if what == "ENDED":
            end = json.loads(res[1])
            return NotLeased(
                f"lease {lease_id} on task {task_id} has already ended ({end.get('outcome')})"
            )
        return StoreUnavailable(f"unexpected answer from the queue script: {res!r}")

    # -- the queue ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Make tasks of new completions and return lapsed leases to the queue."""
        settings = self._settings(
            int(time.time() * 1000),
            ingest_max=self.config.ingest_batch,
            min_n=MIN_CANDIDATES,
        )
        while (await self._call(self._refresh, self._queue_keys(), settings))[0] == "MORE":
            pass

    async def next_task(self, who: Labeller) -> Task | None:
        """The task leased to `who` (the one they hold, else the oldest they have not seen);
        None when there is none for them."""
        if len(who.id) > self.store.config.max_id_chars:
            raise InvalidFeedback(
                f"the labeller name is longer than {self.store.config.max_id_chars}"
            )
        while True:
            lease_id = "lease-" + uuid.uuid4().hex
            settings = self._settings(
                int(time.time() * 1000),
                labeller=who.id,
                lease_id=lease_id,
                lease_ms=int(self.config.lease_s * 1000),
                ingest_max=self.config.ingest_batch,
                min_n=MIN_CANDIDATES,
                scan_max=self.config.scan_max,
            )
            res = await self._call(self._next, self._queue_keys(), settings)
            if res[0] == "MORE":
                continue
            if res[0] == "EMPTY":
                return None
            if res[0] not in ("LEASED", "HELD"):
                raise StoreUnavailable(f"unexpected answer from the queue script: {res!r}")
            task_id, lease_id, until = res[1], res[2], int(res[3])
            return await self._task(task_id, lease_id, until / 1000)

    async def _task(self, task_id: str, lease_id: str, until: float) -> Task:
        rec = await self.store.get_completion(task_id)
        if rec is None:
            raise NotFound(f"the completion of task {task_id} expired while it was leased")
        labels = await self._read(self.client.hget(self.keys.task(task_id), "labels"))
        order = [r.response_id for r in rec.responses]
        random.Random(lease_id).shuffle(order)
        return Task(
            task_id=task_id,
            lease_id=lease_id,
            lease_expires=until,
            completion=rec,
            order=order,
            labels_done=int(labels or 0),
            labels_needed=self.config.labels_per_task,
        )

    async def submit(
        self,
        who: Labeller,
        *,
        task_id: str,
        lease_id: str,
        ranked_response_ids: Sequence[str],
        ranks: Sequence[int] | None = None,
        rating: int | None = None,
        comment: str = "",
    ) -> LabelAck:
        """Store a label of a leased task: the ranking (best first), then the optional Likert
        rating of the top response; then count it on the task. Every check that can fail runs
        before anything is written."""
        self._check_lease_args(who, task_id, lease_id)
        self._check_comment(comment)
        if rating is not None and (
            isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 7
        ):
            raise InvalidFeedback(f"the rating is 1 (worst) to 7 (best), got {rating!r}")
        ids = list(ranked_response_ids)
        t = await self._read(
            self.client.hmget(
                self.keys.task(task_id), "state", "holder", "lease", "until", "responses",
                f"end:{lease_id}",
            )
        )  # fmt: skip
        state, holder, lease, until, responses, ended = (None if v is None else _text(v) for v in t)
        if state is None:
            raise NotFound(f"task {task_id} is unknown")
        if ended is None:
            if holder != who.id or lease != lease_id:
                raise self._refused(["NOTYOURS", state], task_id, lease_id)
            if until is None or int(until) <= time.time() * 1000:
                raise self._refused(["LAPSED", until or "0"], task_id, lease_id)
        rank_list = self._check_ranking(task_id, ids, ranks, json.loads(responses or "[]"))
        label = {
            "outcome": "labelled",
            "labeller": who.id,
            "ids": ids,
            "ranks": rank_list,
            "rating": rating,
            "comment": comment,
        }
        if ended is not None:  # a repeat of an ended lease: the first answer, or a conflict
            return self._replay(json.loads(ended), label, task_id, lease_id)
        ikey = f"label-{lease_id}"
        ack = await self.store.submit_ranking(
            user_id=who.user_id,
            idempotency_key=ikey,
            completion_id=task_id,
            ranked_response_ids=ids,
            ranks=rank_list,
            principal=who.principal,
        )
        rating_id = ""
        if rating is not None:
            rated = await self.store.submit_rating(
                user_id=who.user_id,
                idempotency_key=f"{ikey}-rating",
                response_id=ids[0],
                scale="likert7",
                score=rating,
                principal=who.principal,
            )
            rating_id = rated.feedback_id
        label.update(feedback_id=ack.feedback_id, rating_feedback_id=rating_id, at=ack.created_at)
        now_ms = int(time.time() * 1000)
        k = self.keys
        res = await self._call(
            self._complete,
            [
                k.task(task_id), k.seen(task_id), k.queue, k.leased, k.holders, k.stats,
                k.done, k.recent,
            ],
            self._settings(
                now_ms,
                labeller=who.id,
                lease=lease_id,
                task=task_id,
                needed=self.config.labels_per_task,
                ids=ids,
                ranks=rank_list,
                recent_ms=self.config.recent_window_s * 1000,
                end=json.dumps(label, separators=(",", ":"), ensure_ascii=False),
            ),
        )  # fmt: skip
        if res[0] == "ENDED":
            # A concurrent repeat counted the label first. Which call is the duplicate is the
            # store's word: the one whose ranking write was new is not.
            first = self._replay(json.loads(res[1]), label, task_id, lease_id)
            return LabelAck(
                first.feedback_id, ack.duplicate, first.created_at, first.rating_feedback_id
            )
        if res[0] != "OK":
            raise self._refused(res, task_id, lease_id)
        return LabelAck(ack.feedback_id, ack.duplicate, ack.created_at, rating_id, int(res[1]))

    def _check_ranking(
        self, task_id: str, ids: list[str], ranks: Sequence[int] | None, candidates: list[str]
    ) -> list[int]:
        """The ranking must order exactly the task's candidates; returns its dense ranks."""
        known = set(candidates)
        for rid in ids:
            if rid not in known:
                raise InvalidFeedback(
                    f"response {rid[:80]!r} is not a candidate of task {task_id}; rank the "
                    "candidates you were shown"
                )
        if len(set(ids)) != len(ids):
            raise InvalidFeedback("a response appears more than once in the ranking")
        missing = [r for r in candidates if r not in set(ids)]
        if missing:
            raise InvalidFeedback(
                f"rank every candidate of task {task_id}: {len(missing)} of {len(candidates)} "
                f"missing ({', '.join(missing)})"
            )
        return normalize_ranks(ranks, len(ids))

    def _replay(
        self, end: dict[str, Any], label: dict[str, Any], task_id: str, lease_id: str
    ) -> LabelAck:
        if end.get("outcome") != "labelled":
            raise NotLeased(
                f"lease {lease_id} on task {task_id} has already ended ({end.get('outcome')})"
            )
        same = all(
            end.get(k) == label[k] for k in ("labeller", "ids", "ranks", "rating", "comment")
        )
        if not same:
            raise IdempotencyConflict(
                f"lease {lease_id} of task {task_id} was already used for a different label "
                f"(feedback {end.get('feedback_id')}); ask for the next task",
                feedback_id=str(end.get("feedback_id", "")),
            )
        return LabelAck(
            str(end["feedback_id"]),
            True,
            float(end.get("at", 0.0)),
            str(end.get("rating_feedback_id", "")),
        )

    async def skip(self, who: Labeller, *, task_id: str, lease_id: str) -> bool:
        """Give a leased task back for the others (never again to `who`). Returns True when
        this call skipped it, False for a repeat of the same skip."""
        self._check_lease_args(who, task_id, lease_id)
        k = self.keys
        end = {"outcome": "skipped", "labeller": who.id, "at": time.time()}
        res = await self._call(
            self._skip,
            [k.task(task_id), k.seen(task_id), k.queue, k.leased, k.holders, k.stats],
            self._settings(
                int(time.time() * 1000), labeller=who.id, lease=lease_id, task=task_id,
                end=json.dumps(end, separators=(",", ":")),
            ),
        )  # fmt: skip
        return self._released(res, "skipped", task_id, lease_id)

    async def flag(
        self, who: Labeller, *, task_id: str, lease_id: str, reason: str, comment: str = ""
    ) -> bool:
        """Take a leased task out of the queue as unsafe, broken or other. Returns True when
        this call flagged it, False for a repeat."""
        self._check_lease_args(who, task_id, lease_id)
        if reason not in FLAG_REASONS:
            raise InvalidFeedback(
                f"unknown flag reason {reason!r}; use one of {', '.join(FLAG_REASONS)}"
            )
        self._check_comment(comment)
        k = self.keys
        end = {
            "outcome": "flagged",
            "labeller": who.id,
            "reason": reason,
            "comment": comment,
            "at": time.time(),
        }
        res = await self._call(
            self._flag,
            [k.task(task_id), k.queue, k.leased, k.holders, k.stats, k.flagged],
            self._settings(
                int(time.time() * 1000), labeller=who.id, lease=lease_id, task=task_id,
                reason=reason, end=json.dumps(end, separators=(",", ":"), ensure_ascii=False),
            ),
        )  # fmt: skip
        return self._released(res, "flagged", task_id, lease_id)

    def _released(self, res: list[Any], outcome: str, task_id: str, lease_id: str) -> bool:
        if res[0] == "OK":
            return True
        if res[0] == "ENDED" and json.loads(res[1]).get("outcome") == outcome:
            return False
        raise self._refused(res, task_id, lease_id)

    # -- reading ------------------------------------------------------------------------------

    async def stats(self) -> QueueStats:
        """The queue's figures (brought up to date first: new completions, lapsed leases)."""
        await self.refresh()
        k = self.keys
        now_ms = int(time.time() * 1000)
        try:
            async with self.client.pipeline(transaction=False) as p:
                p.hgetall(k.stats)
                p.zcard(k.queue)
                p.zcard(k.leased)
                p.zcard(k.done)
                p.zcard(k.flagged)
                p.zcount(k.recent, now_ms - 3_600_000, "+inf")
                raw, available, leased, done, flagged, last_hour = await p.execute()
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"Redis is unavailable: {e}") from e
        h = {_text(a): int(b) for a, b in raw.items()}
        labellers: dict[str, LabellerFigures] = {}
        reasons: dict[str, int] = {}
        for name, value in h.items():
            kind, sep, who = name.partition(":")
            if not sep:
                continue
            if kind == "flags":
                reasons[who] = value
                continue
            f = labellers.setdefault(who, LabellerFigures())
            if kind == "labels":
                f.labels = value
            elif kind == "judged":
                f.pairs_judged = value
            elif kind == "agreed":
                f.pairs_agreed = value
        return QueueStats(
            available=int(available),
            leased=int(leased),
            done=int(done),
            flagged=int(flagged),
            tasks=h.get("tasks", 0),
            labels=h.get("labels", 0),
            labels_last_hour=int(last_hour),
            skips=h.get("skips", 0),
            lapsed=h.get("lapsed", 0),
            expired=h.get("expired", 0),
            labels_per_task=self.config.labels_per_task,
            pairs_judged=h.get("pairs_judged", 0),
            pairs_agreed=h.get("pairs_agreed", 0),
            flags_by_reason=reasons,
            labellers=labellers,
        )
