"""The files of one feedback snapshot, written from the feedback and completion logs.

`SnapshotWriter.write` reads the logs' entries between the bounds the export fixed, in batches
(bounded memory), and writes the data sets export.py's docstring describes; it returns their
manifest. Each file is counted and hashed as it is written.

A first, light pass reads who gave each ranking and comparison, so that no source supplies more
than its cap of the preference data (feedback/poisoning.py); the second pass writes the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import redis

from instructloop.feedback.keys import Keys
from instructloop.feedback.poisoning import (
    MajorityAgreement,
    SourceCaps,
    SourceLimiter,
    user_key,
)
from instructloop.feedback.records import CompletionRecord, FeedbackRecord

PREFERENCE_KINDS = ("ranking", "comparison")
"""The kinds that become the reward model's training pairs (and so are capped per source)."""
FILES = ("rankings.jsonl", "preferences.jsonl", "sft.jsonl", "ptx.jsonl", "prompts.jsonl")
BATCH = 500
"""Log entries read (and records fetched in one pipeline) at a time."""

EntriesAfter = Callable[[redis.Redis, str, str, str], Iterator[tuple[str, dict[str, str]]]]


@dataclass(frozen=True)
class StreamBounds:
    """The export's window on the two logs: lower < id <= upper."""

    feedback_lower: str
    feedback_upper: str
    completions_lower: str
    completions_upper: str


@dataclass
class ExportManifest:
    """What one export holds (written as manifest.json)."""

    snapshot_id: str
    created_at: float
    key_prefix: str
    feedback_since: str
    """Exclusive lower bound on the feedback log's ids ("0-0": from the beginning)."""
    feedback_upper: str
    """Inclusive upper bound on the feedback log's ids, read once at the start."""
    completions_since: str
    completions_upper: str
    since_snapshot: str | None
    feedback_ids: list[str]
    """Exactly the feedback this export holds, in log order."""
    skipped: dict[str, list[str]]
    """Feedback in range but not exported: "completion_expired", "feedback_expired",
    "source_cap" (over its user's or principal's share, feedback/poisoning.py)."""
    counts: dict[str, int]
    """feedback (included), per kind, skipped, tied_pairs_omitted (from preferences.jsonl)."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """File name -> {"rows": n, "sha256": hex}."""
    sources: dict[str, Any] = field(default_factory=dict)
    """Who supplied the preference data: "caps" (the allowance per user and per principal,
    None where nobody was cut) and "users" (user -> kept, dropped, pairs judged against other
    users and agreement with their majority)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_file(cls, path: Path) -> ExportManifest:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        return cls(**json.loads(path.read_text()))


class _Writer:
    """A JSONL file that counts its rows and hashes its bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: TextIO = path.open("w", encoding="utf-8")
        self.sha = hashlib.sha256()
        self.rows = 0

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        self.fh.write(line)
        self.sha.update(line.encode("utf-8"))
        self.rows += 1

    def close(self) -> dict[str, Any]:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return {"rows": self.rows, "sha256": self.sha.hexdigest()}


def _prompt(c: CompletionRecord) -> str | list[dict[str, str]]:
    return c.prompt if c.prompt is not None else list(c.messages or [])


def _answer(c: CompletionRecord, text: str) -> str | list[dict[str, str]]:
    # TRL: conversational prompts pair with conversational completions.
    return text if c.prompt is not None else [{"role": "assistant", "content": text}]


def _user_text(c: CompletionRecord) -> str:
    if c.prompt is not None:
        return c.prompt
    return "\n\n".join(m["content"] for m in c.messages or [] if m.get("content"))


class SnapshotWriter:
    """Writes one snapshot's files into `out`; `write` returns its manifest."""

    def __init__(
        self, r: redis.Redis, keys: Keys, out: Path, caps: SourceCaps | None = None
    ) -> None:
        self.r, self.keys = r, keys
        self.caps = caps or SourceCaps()
        self.limiter = SourceLimiter(None, None)
        self.agreement = MajorityAgreement()
        self.files = {name: _Writer(out / name) for name in FILES}
        self.completions: dict[str, CompletionRecord | None] = {}
        self.included: list[str] = []
        self.skipped: dict[str, list[str]] = {
            "completion_expired": [],
            "feedback_expired": [],
            "source_cap": [],
        }
        self.counts = {"comparison": 0, "ranking": 0, "rating": 0, "tied_pairs_omitted": 0}
        self._sft_seen: set[str] = set()
        self._ptx_seen: set[str] = set()
        self._prompt_seen: set[str] = set()

    def write(self, bounds: StreamBounds, entries_after: EntriesAfter) -> ExportManifest:
        created = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created))
        snapshot_id = f"snap-{stamp}-" + uuid.uuid4().hex[:8]
        sources = self._preference_sources(bounds, entries_after)
        self.limiter = SourceLimiter.plan(sources, self.caps)
        log = entries_after(
            self.r, self.keys.feedback_log, bounds.feedback_lower, bounds.feedback_upper
        )
        for batch in _batched(entry for _, entry in log):
            self._feedback_batch(batch)
        # PPO prompts: every logged completion in range, whether or not it got feedback.
        log = entries_after(
            self.r, self.keys.completion_log, bounds.completions_lower, bounds.completions_upper
        )
        for batch in _batched(entry["completion_id"] for _, entry in log):
            self._prompts_batch(batch)
        files = {name: writer.close() for name, writer in self.files.items()}
        self.counts.update(
            feedback=len(self.included), skipped=sum(len(v) for v in self.skipped.values())
        )
        return ExportManifest(
            snapshot_id=snapshot_id,
            created_at=created,
            key_prefix=self.keys.prefix,
            feedback_since=bounds.feedback_lower,
            feedback_upper=bounds.feedback_upper,
            completions_since=bounds.completions_lower,
            completions_upper=bounds.completions_upper,
            since_snapshot=None,
            feedback_ids=self.included,
            skipped=self.skipped,
            counts=self.counts,
            files=files,
            sources=self._sources_report(),
        )

    def _preference_sources(
        self, bounds: StreamBounds, entries_after: EntriesAfter
    ) -> list[tuple[str, str]]:
        """(principal, user) of every ranking and comparison in range, in log order."""
        log = entries_after(
            self.r, self.keys.feedback_log, bounds.feedback_lower, bounds.feedback_upper
        )
        sources: list[tuple[str, str]] = []
        for batch in _batched(e for _, e in log if e.get("kind") in PREFERENCE_KINDS):
            pipe = self.r.pipeline(transaction=False)
            for entry in batch:
                pipe.hmget(self.keys.feedback(entry["feedback_id"]), ["principal", "user_id"])
            for principal, user in pipe.execute():
                if user is not None:  # an expired record is skipped in the writing pass
                    sources.append((_text(principal), _text(user)))
        return sources

    def _sources_report(self) -> dict[str, Any]:
        lim = self.limiter
        agreement = self.agreement.per_user()
        users = {
            u: {
                "kept": lim.kept_users[u],
                "dropped": lim.dropped_users[u],
                **agreement.get(u, {"judged": 0, "agreement": None}),
            }
            for u in sorted(set(lim.kept_users) | set(lim.dropped_users))
        }
        return {"caps": {"user": lim.user_cap, "principal": lim.principal_cap}, "users": users}

    def _load_completions(self, cids: set[str]) -> None:
        todo = [c for c in cids if c not in self.completions]
        pipe = self.r.pipeline(transaction=False)
        for cid in todo:
            pipe.hget(self.keys.completion(cid), "record")
        for cid, raw in zip(todo, pipe.execute(), strict=True):
            self.completions[cid] = None if raw is None else CompletionRecord.from_json(raw)

    def _feedback_batch(self, batch: list[dict[str, str]]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for entry in batch:
            pipe.hgetall(self.keys.feedback(entry["feedback_id"]))
        hashes = pipe.execute()
        self._load_completions({e["completion_id"] for e in batch})
        for entry, h in zip(batch, hashes, strict=True):
            fid = entry["feedback_id"]
            if not h:
                self.skipped["feedback_expired"].append(fid)
                continue
            fb = FeedbackRecord.from_redis_hash(h)
            c = self.completions.get(fb.completion_id)
            if c is None:
                self.skipped["completion_expired"].append(fid)
                continue
            principal = getattr(fb, "principal", "") or ""
            if fb.kind in PREFERENCE_KINDS and not self.limiter.admit(principal, fb.user_id):
                self.skipped["source_cap"].append(fid)
                continue
            self.included.append(fid)
            self.counts[fb.kind] += 1
            self._ptx(c)
            if fb.kind == "rating":
                if (fb.scale == "thumb" and fb.score == 1) or (
                    fb.scale == "likert7" and (fb.score or 0) >= 6
                ):
                    self._sft(fb, c, fb.response_id or "")
            else:
                self._ranking(fb, c)
        self.completions.clear()  # bounded memory; a completion judged again is simply re-read

    def _ptx(self, c: CompletionRecord) -> None:
        text = _user_text(c)
        if text and text not in self._ptx_seen:
            self._ptx_seen.add(text)
            self.files["ptx.jsonl"].write({"text": text})

    def _ranking(self, fb: FeedbackRecord, c: CompletionRecord) -> None:
        order, ranks = fb.ordering()
        user = user_key(getattr(fb, "principal", "") or "", fb.user_id)
        self.agreement.add(c.completion_id, user, order, ranks)
        responses = [c.response(rid) for rid in order]
        self.files["rankings.jsonl"].write(
            {
                "feedback_id": fb.feedback_id,
                "kind": fb.kind,
                "completion_id": c.completion_id,
                "model_version": c.model_version,
                "user_id": fb.user_id,
                "prompt": _prompt(c),
                "prompt_text": c.prompt_text,
                "prompt_token_ids": c.prompt_token_ids,
                "response_ids": order,
                "responses": [x.text for x in responses],
                "response_token_ids": [x.token_ids for x in responses],
                "finish_reasons": [x.finish_reason for x in responses],
                "ranks": ranks,
                "created_at": fb.created_at,
            }
        )
        # InstructGPT §3.5: a ranking of K gives C(K, 2) comparisons; ties give none.
        for i in range(len(order)):
            for j in range(i + 1, len(order)):
                if ranks[i] == ranks[j]:
                    self.counts["tied_pairs_omitted"] += 1
                    continue
                self.files["preferences.jsonl"].write(
                    {
                        "prompt": _prompt(c),
                        "chosen": _answer(c, responses[i].text),
                        "rejected": _answer(c, responses[j].text),
                        "feedback_id": fb.feedback_id,
                        "completion_id": c.completion_id,
                    }
                )
        if ranks.count(1) < len(ranks):  # a total tie demonstrates nothing
            self._sft(fb, c, order[0])

    def _sft(self, fb: FeedbackRecord, c: CompletionRecord, response_id: str) -> None:
        if response_id in self._sft_seen:
            return
        self._sft_seen.add(response_id)
        self.files["sft.jsonl"].write(
            {
                "prompt": _prompt(c),
                "prompt_text": c.prompt_text,
                "completion": c.response(response_id).text,
                "feedback_id": fb.feedback_id,
                "completion_id": c.completion_id,
                "response_id": response_id,
                "source": fb.kind,
            }
        )

    def _prompts_batch(self, cids: list[str]) -> None:
        self._load_completions(set(cids))
        for cid in cids:
            c = self.completions.get(cid)
            if c is None or c.prompt_text in self._prompt_seen:
                continue
            self._prompt_seen.add(c.prompt_text)
            self.files["prompts.jsonl"].write(
                {
                    "completion_id": cid,
                    "user_id": c.user_id,
                    "model_version": c.model_version,
                    "prompt": _prompt(c),
                    "prompt_text": c.prompt_text,
                }
            )
        self.completions.clear()  # bounded memory: prompts are read once


def _text(v: bytes | str | None) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


def _batched(items: Iterator[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
