"""Export: hand-computed expansions, the manifest's exact feedback ids, incremental exports,
expired records, and a consistent snapshot while writes go on."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from instructloop.cli import main as cli_main
from instructloop.feedback.config import StoreConfig
from instructloop.feedback.errors import ExportError
from instructloop.feedback.export import ExportManifest, export_snapshot, feedback_since
from instructloop.feedback.records import CompletionRecord
from instructloop.feedback.store import FeedbackStore
from tests.support.records import ids, make_completion


@pytest.fixture
async def store(redis_client: Any, redis_url: str) -> AsyncIterator[FeedbackStore]:
    s = FeedbackStore.from_url(redis_url, StoreConfig(rate_limit_per_minute=0))
    yield s
    await s.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def text(rec: CompletionRecord, rid: str) -> str:
    return rec.response(rid).text


async def test_export_by_hand(store: FeedbackStore, redis_url: str, tmp_path: Path) -> None:
    raw = make_completion(4, prompt="Name four colours.")
    chat = make_completion(2, messages=[{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Say hi."}])  # fmt: skip
    unjudged = make_completion(2, prompt="Nobody judges this one.")
    for rec in (raw, chat, unjudged):
        await store.log_completion(rec)
    r0, r1, r2, r3 = ids(raw)
    c0, c1 = ids(chat)

    # K = 4, best first r2 > (r0 = r3) > r1
    rank = await store.submit_ranking(
        user_id="alice", idempotency_key="1", completion_id=raw.completion_id,
        ranked_response_ids=[r2, r0, r3, r1], ranks=[1, 2, 2, 3],
    )  # fmt: skip
    cmp = await store.submit_comparison(
        user_id="bob", idempotency_key=None, chosen_response_id=c1, rejected_response_id=c0
    )
    tie = await store.submit_comparison(
        user_id="bob", idempotency_key=None, chosen_response_id=c0, rejected_response_id=c1,
        tie=True,
    )  # fmt: skip
    like6 = await store.submit_rating(
        user_id="carol", idempotency_key=None, response_id=r1, scale="likert7", score=6
    )
    like5 = await store.submit_rating(
        user_id="carol", idempotency_key=None, response_id=r0, scale="likert7", score=5
    )
    up_again = await store.submit_rating(  # same response as the comparison's chosen one
        user_id="carol", idempotency_key=None, response_id=c1, scale="thumb", score=1
    )
    down = await store.submit_rating(
        user_id="carol", idempotency_key=None, response_id=r3, scale="thumb", score=-1
    )
    acks = [rank, cmp, tie, like6, like5, up_again, down]

    out = tmp_path / "snap"
    m = export_snapshot(redis_url, out)

    assert m.feedback_ids == [a.feedback_id for a in acks]
    assert m.skipped == {"completion_expired": [], "feedback_expired": [], "source_cap": []}
    assert m.counts == {
        "comparison": 2, "ranking": 1, "rating": 4, "tied_pairs_omitted": 2, "feedback": 7,
        "skipped": 0,
    }  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "preferences.jsonl", "prompts.jsonl", "ptx.jsonl", "rankings.jsonl",
        "sft.jsonl",
    ]  # fmt: skip
    assert ExportManifest.from_file(out) == m
    for name, f in m.files.items():
        data = (out / name).read_bytes()
        assert f == {"rows": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}

    rankings = read_jsonl(out / "rankings.jsonl")
    assert [(g["feedback_id"], g["response_ids"], g["ranks"]) for g in rankings] == [
        (rank.feedback_id, [r2, r0, r3, r1], [1, 2, 2, 3]),
        (cmp.feedback_id, [c1, c0], [1, 2]),
        (tie.feedback_id, [c0, c1], [1, 1]),
    ]
    g = rankings[0]
    assert g["responses"] == [text(raw, r) for r in (r2, r0, r3, r1)]
    assert g["prompt"] == "Name four colours." == g["prompt_text"]
    assert g["model_version"] == "v1" and g["user_id"] == "alice"
    assert g["response_token_ids"] == [raw.response(r).token_ids for r in (r2, r0, r3, r1)]
    assert rankings[1]["prompt"] == chat.messages
    assert rankings[1]["prompt_text"] == chat.prompt_text

    # C(4, 2) = 6 pairs, minus the tied (r0, r3): 5; the comparison: 1; the tie: 0.
    prefs = read_jsonl(out / "preferences.jsonl")
    t = {r: text(raw, r) for r in ids(raw)}
    assert [(p["chosen"], p["rejected"]) for p in prefs[:5]] == [
        (t[r2], t[r0]), (t[r2], t[r3]), (t[r2], t[r1]), (t[r0], t[r1]), (t[r3], t[r1]),
    ]  # fmt: skip
    assert all(p["prompt"] == "Name four colours." for p in prefs[:5])
    assert {p["feedback_id"] for p in prefs[:5]} == {rank.feedback_id}
    assert prefs[5] == {  # TRL's conversational form
        "prompt": chat.messages,
        "chosen": [{"role": "assistant", "content": text(chat, c1)}],
        "rejected": [{"role": "assistant", "content": text(chat, c0)}],
        "feedback_id": cmp.feedback_id,
        "completion_id": chat.completion_id,
    }
    assert len(prefs) == 6

    # demonstrations: ranking's best, comparison's chosen, Likert 6; the thumb-up picks c1
    # again (one line per response); Likert 5, thumb down and the tie give none.
    sft = read_jsonl(out / "sft.jsonl")
    assert [(s["response_id"], s["source"]) for s in sft] == [
        (r2, "ranking"), (c1, "comparison"), (r1, "rating"),
    ]  # fmt: skip
    assert sft[0]["completion"] == t[r2] and sft[0]["prompt_text"] == raw.prompt_text
    assert sft[1]["prompt"] == chat.messages

    assert read_jsonl(out / "ptx.jsonl") == [{"text": "Name four colours."},
                                             {"text": "Be brief.\n\nSay hi."}]  # fmt: skip
    prompts = read_jsonl(out / "prompts.jsonl")
    assert [p["completion_id"] for p in prompts] == [
        raw.completion_id, chat.completion_id, unjudged.completion_id,
    ]  # fmt: skip


async def test_incremental_exports(
    store: FeedbackStore, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    rec = await logged_with(store)
    first = [await thumbs(store, rec, i) for i in range(3)]
    m1 = export_snapshot(redis_url, tmp_path / "one")
    assert m1.feedback_ids == first
    rec2 = await logged_with(store)
    second = [await thumbs(store, rec2, i) for i in range(2)]
    # by snapshot id (recorded in Redis), by directory, by stream id: the same new feedback
    m2 = export_snapshot(redis_url, tmp_path / "two", since_snapshot=m1.snapshot_id)
    m3 = export_snapshot(redis_url, tmp_path / "three", since_snapshot=str(tmp_path / "one"))
    m4 = export_snapshot(redis_url, tmp_path / "four", since_snapshot=m1.feedback_upper)
    assert m2.feedback_ids == m3.feedback_ids == m4.feedback_ids == second
    assert m2.since_snapshot == m1.snapshot_id
    assert m2.feedback_since == m1.feedback_upper
    # prompts follow the completion log the same way (by snapshot; a stream id bounds feedback)
    assert [p["completion_id"] for p in read_jsonl(tmp_path / "two" / "prompts.jsonl")] == [
        rec2.completion_id
    ]
    assert len(read_jsonl(tmp_path / "four" / "prompts.jsonl")) == 2
    # nothing new: an empty export
    m5 = export_snapshot(redis_url, tmp_path / "five", since_snapshot=m2.snapshot_id)
    assert m5.feedback_ids == [] and m5.counts["feedback"] == 0
    snaps = redis_client.hkeys("il:snapshots")
    assert {s.decode() for s in snaps} == {m.snapshot_id for m in (m1, m2, m3, m4, m5)}

    refs = feedback_since(redis_url, m1.snapshot_id)
    assert [r.feedback_id for r in refs] == second
    assert [r.feedback_id for r in feedback_since(redis_url)] == first + second
    assert feedback_since(redis_url, kinds=("comparison",)) == []


async def logged_with(store: FeedbackStore) -> CompletionRecord:
    rec = make_completion(3, prompt=f"prompt {id(store)} {len(await store.counters())}")
    await store.log_completion(rec)
    return rec


async def thumbs(store: FeedbackStore, rec: CompletionRecord, i: int) -> str:
    ack = await store.submit_rating(
        user_id="u", idempotency_key=None, response_id=ids(rec)[i % 3], scale="thumb", score=1
    )
    return ack.feedback_id


async def test_expired_records_are_skipped_and_listed(
    store: FeedbackStore, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    keep = await logged_with(store)
    gone = make_completion(2, prompt="soon gone")
    await store.log_completion(gone)
    a = await thumbs(store, keep, 0)
    b = (
        await store.submit_comparison(
            user_id="u",
            idempotency_key=None,
            chosen_response_id=ids(gone)[0],
            rejected_response_id=ids(gone)[1],
        )
    ).feedback_id
    c = await thumbs(store, keep, 1)
    # what a TTL expiry does, without waiting for it
    redis_client.delete(f"il:cmpl:{gone.completion_id}")
    redis_client.delete(f"il:fb:{c}")
    m = export_snapshot(redis_url, tmp_path / "x")
    assert m.feedback_ids == [a]
    assert m.skipped == {"completion_expired": [b], "feedback_expired": [c], "source_cap": []}
    assert m.counts["skipped"] == 2
    assert read_jsonl(tmp_path / "x" / "rankings.jsonl") == []


async def test_snapshot_is_consistent_while_writes_go_on(
    store: FeedbackStore, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    recs = [make_completion(4) for _ in range(20)]
    for rec in recs:
        await store.log_completion(rec)
    written: list[str] = []
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            rec = recs[(w + i) % len(recs)]
            i += 1
            ack = await store.submit_ranking(
                user_id=f"u{w}", idempotency_key=None, completion_id=rec.completion_id,
                ranked_response_ids=ids(rec), ranks=[1, 1, 2, 3],
            )  # fmt: skip
            written.append(ack.feedback_id)

    tasks = [asyncio.create_task(writer(w)) for w in range(8)]
    while len(written) < 2000:  # enough that the export takes a while
        await asyncio.sleep(0.01)
    n_before = len(written)
    m = await asyncio.to_thread(export_snapshot, redis_url, tmp_path / "live")
    n_after = len(written)
    stop.set()
    await asyncio.gather(*tasks)

    # writes went on during the export, and it holds exactly the log up to its bound
    assert n_after > n_before
    in_log = [e[1][b"feedback_id"].decode() for e in redis_client.xrange("il:log:feedback")]
    upto = [
        e[1][b"feedback_id"].decode()
        for e in redis_client.xrange("il:log:feedback", "-", m.feedback_upper)
    ]
    assert len(in_log) > len(upto) >= n_before
    assert m.feedback_ids == upto
    assert set(upto) <= set(written)
    rankings = read_jsonl(tmp_path / "live" / "rankings.jsonl")
    assert [g["feedback_id"] for g in rankings] == upto
    # 4 responses with one tie: 5 pairs each, 1 tied pair omitted each
    assert m.files["preferences.jsonl"]["rows"] == 5 * len(upto)
    assert m.counts["tied_pairs_omitted"] == len(upto)


def test_bad_targets_and_unknown_snapshots(
    redis_client: Any, redis_url: str, tmp_path: Path
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_snapshot(redis_url, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="unknown snapshot"):
        export_snapshot(redis_url, tmp_path / "new", since_snapshot="snap-nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temp dir left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    m = export_snapshot(redis_url, empty)  # an empty directory is fine
    assert m.feedback_ids == [] and (empty / "manifest.json").exists()


async def test_cli_export(
    store: FeedbackStore, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = await logged_with(store)
    await thumbs(store, rec, 0)
    rc = cli_main(["feedback", "export", "--out", str(tmp_path / "cli"), "--redis-url", redis_url])
    assert rc == 0
    out = capsys.readouterr().out
    assert "feedback 1 (rankings 0, comparisons 0, ratings 1)" in out
    m = ExportManifest.from_file(tmp_path / "cli")
    assert m.snapshot_id in out
    rc = cli_main(["feedback", "export", "--out", str(tmp_path / "cli"), "--redis-url", redis_url])
    assert rc == 1
    assert "not an empty directory" in capsys.readouterr().err
