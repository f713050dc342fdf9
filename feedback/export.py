"""Export a consistent snapshot of the feedback for training (sync, redis-py).

Consistency: the export reads the last id of the feedback log stream ONCE, at the start, and
then holds exactly the feedback whose stream entry is at or before that id (and after the
`since` bound). Each feedback write adds its record and its stream entry in one atomic script,
so every entry up to that id belongs to a complete record, and writes that land during the
export get later ids and are left for the next one. The manifest lists the feedback ids it
holds; feedback whose record or completion expired (retention) is skipped and listed apart.

Files (docs/INTERFACES.md), written into a temporary directory that is renamed into place:
- `rankings.jsonl`: one line per ranking group (a comparison is a K = 2 group), best first;
- `preferences.jsonl`: TRL style, each group expanded to all K-choose-2 strictly ordered pairs
  (tied pairs are omitted and counted); conversational prompts in TRL's conversational form;
- `sft.jsonl`: demonstrations: the best response of a ranking (the first listed with rank 1),
  the chosen side of a comparison (not of a tie), Likert >= 6 or thumb-up ratings; one line per
  response even if several judgements picked it;
- `ptx.jsonl`: `{"text"}`: the user-written text (raw prompts, message contents) of the
  snapshot's completions, deduplicated; the only natural text the store has. The training side
  may mix in a general corpus of its own;
- `prompts.jsonl`: every logged completion's prompt up to the completion log's last id (read at
  the start too), deduplicated by prompt text: PPO's prompt set (InstructGPT §3.2 draws PPO
  prompts from the API);
- `manifest.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import redis
from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import ExportError, StoreUnavailable
from instructloop.feedback.keys import Keys
from instructloop.feedback.records import CompletionRecord, FeedbackRecord

FILES = ("rankings.jsonl", "preferences.jsonl", "sft.jsonl", "ptx.jsonl", "prompts.jsonl")
_STREAM_ID = re.compile(r"^\d+-\d+$")
_BATCH = 500


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
    """Feedback in range but not exported: "completion_expired", "feedback_expired"."""
    counts: dict[str, int]
    """feedback (included), per kind, skipped, tied_pairs_omitted (from preferences.jsonl)."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """File name -> {"rows": n, "sha256": hex}."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_file(cls, path: Path) -> ExportManifest:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        return cls(**json.loads(path.read_text()))


@dataclass(frozen=True, slots=True)
class FeedbackRef:
    """One entry of the feedback log."""

    stream_id: str
    feedback_id: str
    kind: str
    completion_id: str


def _client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(
        redis_url, decode_responses=True, socket_timeout=30, socket_connect_timeout=5
    )


def _last_id(r: redis.Redis, stream: str) -> str:
    last = r.xrevrange(stream, "+", "-", count=1)
    return str(last[0][0]) if last else "0-0"


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, seq = stream_id.split("-")
    return int(ms), int(seq)


def resolve_since(r: redis.Redis, keys: Keys, since: str | None) -> tuple[str, str]:
    """(feedback lower bound, completion lower bound) for `since`, exclusive.

    `since` is None (everything), a snapshot id of an earlier export (looked up in Redis), a
    feedback-log stream id such as "1700000000000-0" (bounds the feedback only; prompts.jsonl
    then starts from the beginning), or the path of an earlier export's directory or manifest.
    """
    if not since:
        return "0-0", "0-0"
    if _STREAM_ID.match(since):
        return since, "0-0"
    path = Path(since)
    if path.exists():
        m = ExportManifest.from_file(path)
        return m.feedback_upper, m.completions_upper
    raw = r.hget(keys.snapshots, since)
    if raw is None:
        raise ExportError(
            f"unknown snapshot {since!r}: not a snapshot id known to this Redis, a stream id "
            "(<ms>-<seq>) or an export directory"
        )
    info = json.loads(raw)
    return info["feedback_upper"], info["completions_upper"]


def _xrange_after(
    r: redis.Redis, stream: str, lower: str, upper: str
) -> Iterator[tuple[str, dict[str, str]]]:
    """Entries with lower < id <= upper, in batches."""
    if upper == "0-0" or _id_key(upper) <= _id_key(lower):
        return
    start = "-" if lower == "0-0" else "(" + lower
    while True:
        batch = r.xrange(stream, start, upper, count=_BATCH)
        if not batch:
            return
        yield from batch
        start = "(" + batch[-1][0]
        if len(batch) < _BATCH:
            return


def feedback_since(
    redis_url: str,
    since: str | None = None,
    *,
    config: StoreConfig | None = None,
    kinds: tuple[str, ...] | None = None,
) -> list[FeedbackRef]:
    """The feedback log entries after `since` (see resolve_since), oldest first.

    The training loop asks this for "N new comparisons since the last reward model".
    """
    keys = Keys((config or StoreConfig()).key_prefix)
    r = _client(redis_url)
    try:
        lower, _ = resolve_since(r, keys, since)
        upper = _last_id(r, keys.feedback_log)
        return [
            FeedbackRef(sid, f["feedback_id"], f["kind"], f["completion_id"])
            for sid, f in _xrange_after(r, keys.feedback_log, lower, upper)
            if kinds is None or f["kind"] in kinds
        ]
    except redis.RedisError as e:
        raise StoreUnavailable(f"Redis is unavailable: {e}") from e
    finally:
        r.close()


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


def export_snapshot(
    redis_url: str,
    out_dir: Path,
    *,
    config: StoreConfig | None = None,
    since_snapshot: str | None = None,
) -> ExportManifest:
    """Write a consistent snapshot of the feedback (after `since_snapshot`) into `out_dir`.

    `out_dir` must not exist or be empty; it appears complete or not at all (temporary
    directory, then rename). The snapshot is recorded in Redis so that a later export can
    continue from it (`since_snapshot=<its id>`).
    """
    cfg = config or StoreConfig()
    keys = Keys(cfg.key_prefix)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    r = _client(redis_url)
    try:
        # The bounds, read once: everything up to them is in, nothing after.
        fb_upper = _last_id(r, keys.feedback_log)
        cmpl_upper = _last_id(r, keys.completion_log)
        fb_lower, cmpl_lower = resolve_since(r, keys, since_snapshot)
        tmp.mkdir()
        manifest = _write_files(r, keys, tmp, fb_lower, fb_upper, cmpl_lower, cmpl_upper)
        manifest.since_snapshot = since_snapshot
        manifest.key_prefix = cfg.key_prefix
        (tmp / "manifest.json").write_text(manifest.to_json() + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
        summary = {
            k: v for k, v in asdict(manifest).items() if k not in ("feedback_ids", "skipped")
        }
        summary["out_dir"] = str(out_dir)
        r.hset(keys.snapshots, manifest.snapshot_id, json.dumps(summary))
        return manifest
    except redis.RedisError as e:
        raise StoreUnavailable(f"Redis is unavailable during the export: {e}") from e
    finally:
        r.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_files(
    r: redis.Redis,
    keys: Keys,
    tmp: Path,
    fb_lower: str,
    fb_upper: str,
    cmpl_lower: str,
    cmpl_upper: str,
) -> ExportManifest:
    created = time.time()
    snapshot_id = (
        f"snap-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(created))}-" + (uuid.uuid4().hex[:8])
    )
    w = {name: _Writer(tmp / name) for name in FILES}
    completions: dict[str, CompletionRecord | None] = {}
    included: list[str] = []
    skipped: dict[str, list[str]] = {"completion_expired": [], "feedback_expired": []}
    counts = {"comparison": 0, "ranking": 0, "rating": 0, "tied_pairs_omitted": 0}
    sft_seen: set[str] = set()
    ptx_seen: set[str] = set()

    def load_completions(cids: set[str]) -> None:
        todo = [c for c in cids if c not in completions]
        pipe = r.pipeline(transaction=False)
        for cid in todo:
            pipe.hget(keys.completion(cid), "record")
        for cid, raw in zip(todo, pipe.execute(), strict=True):
            completions[cid] = None if raw is None else CompletionRecord.from_json(raw)

    def sft(fb: FeedbackRecord, c: CompletionRecord, response_id: str) -> None:
        if response_id in sft_seen:
            return
        sft_seen.add(response_id)
        w["sft.jsonl"].write(
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

    batch: list[tuple[str, dict[str, str]]] = []

    def flush() -> None:
        pipe = r.pipeline(transaction=False)
        for _, entry in batch:
            pipe.hgetall(keys.feedback(entry["feedback_id"]))
        hashes = pipe.execute()
        load_completions({e["completion_id"] for _, e in batch})
        for (_, entry), h in zip(batch, hashes, strict=True):
            fid = entry["feedback_id"]
            if not h:
                skipped["feedback_expired"].append(fid)
                continue
            fb = FeedbackRecord.from_redis_hash(h)
            c = completions.get(fb.completion_id)
            if c is None:
                skipped["completion_expired"].append(fid)
                continue
            included.append(fid)
            counts[fb.kind] += 1
            text = _user_text(c)
            if text and text not in ptx_seen:
                ptx_seen.add(text)
                w["ptx.jsonl"].write({"text": text})
            if fb.kind == "rating":
                if (fb.scale == "thumb" and fb.score == 1) or (
                    fb.scale == "likert7" and (fb.score or 0) >= 6
                ):
                    sft(fb, c, fb.response_id or "")
                continue
            order, ranks = fb.ordering()
            responses = [c.response(rid) for rid in order]
            w["rankings.jsonl"].write(
                {
                    "feedback_id": fid,
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
                        counts["tied_pairs_omitted"] += 1
                        continue
                    w["preferences.jsonl"].write(
                        {
                            "prompt": _prompt(c),
                            "chosen": _answer(c, responses[i].text),
                            "rejected": _answer(c, responses[j].text),
                            "feedback_id": fid,
                            "completion_id": c.completion_id,
                        }
                    )
            if ranks.count(1) < len(ranks):  # a total tie demonstrates nothing
                sft(fb, c, order[0])
        batch.clear()
        completions.clear()  # bounded memory; a completion judged again is simply re-read

    for sid, entry in _xrange_after(r, keys.feedback_log, fb_lower, fb_upper):
        batch.append((sid, entry))
        if len(batch) >= _BATCH:
            flush()
    if batch:
        flush()

    # PPO prompts: every logged completion in range, whether or not it got feedback.
    prompt_seen: set[str] = set()
    cids: list[str] = []

    def flush_prompts() -> None:
        load_completions(set(cids))
        for cid in cids:
            c = completions.get(cid)
            if c is None or c.prompt_text in prompt_seen:
                continue
            prompt_seen.add(c.prompt_text)
            w["prompts.jsonl"].write(
                {
                    "completion_id": cid,
                    "user_id": c.user_id,
                    "model_version": c.model_version,
                    "prompt": _prompt(c),
                    "prompt_text": c.prompt_text,
                }
            )
        cids.clear()
        completions.clear()  # bounded memory: prompts are read once

    for _, entry in _xrange_after(r, keys.completion_log, cmpl_lower, cmpl_upper):
        cids.append(entry["completion_id"])
        if len(cids) >= _BATCH:
            flush_prompts()
    if cids:
        flush_prompts()

    files = {name: writer.close() for name, writer in w.items()}
    counts.update(feedback=len(included), skipped=sum(len(v) for v in skipped.values()))
    return ExportManifest(
        snapshot_id=snapshot_id,
        created_at=created,
        key_prefix=keys.prefix,
        feedback_since=fb_lower,
        feedback_upper=fb_upper,
        completions_since=cmpl_lower,
        completions_upper=cmpl_upper,
        since_snapshot=None,
        feedback_ids=included,
        skipped=skipped,
        counts=counts,
        files=files,
    )
