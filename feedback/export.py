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

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import ExportError, StoreUnavailable
from instructloop.feedback.keys import Keys
from instructloop.feedback.poisoning import SourceCaps
from instructloop.feedback.snapshot_files import (
    ExportManifest,
    SnapshotWriter,
    StreamBounds,
)

_STREAM_ID = re.compile(r"^\d+-\d+$")
_BATCH = 500


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


def export_snapshot(
    redis_url: str,
    out_dir: Path,
    *,
    config: StoreConfig | None = None,
    since_snapshot: str | None = None,
    caps: SourceCaps | None = None,
) -> ExportManifest:
    """Write a consistent snapshot of the feedback (after `since_snapshot`) into `out_dir`.

    `out_dir` must not exist or be empty; it appears complete or not at all (temporary
    directory, then rename). The snapshot is recorded in Redis so that a later export can
    continue from it (`since_snapshot=<its id>`). `caps`: each source's share of the rankings
    and comparisons (feedback/poisoning.py; default SourceCaps()).
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
        bounds = StreamBounds(fb_lower, fb_upper, cmpl_lower, cmpl_upper)
        manifest = SnapshotWriter(r, keys, tmp, caps).write(bounds, _xrange_after)
        manifest.since_snapshot = since_snapshot
        manifest.key_prefix = cfg.key_prefix
        (tmp / "manifest.json").write_text(manifest.to_json() + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
        summary = {
            k: v
            for k, v in asdict(manifest).items()
            if k not in ("feedback_ids", "skipped", "sources")
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
