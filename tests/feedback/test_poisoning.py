"""Poisoning limits: no source supplies more than its share of a snapshot's preference data
(feedback/poisoning.py), checked on real Redis through the export, and the allowance against a
brute-force reference."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from instructloop.feedback.config import StoreConfig
from instructloop.feedback.export import export_snapshot
from instructloop.feedback.poisoning import MajorityAgreement, SourceCaps, allowance
from instructloop.feedback.store import FeedbackStore
from tests.support.records import ids, make_completion


def brute_allowance(counts: dict[str, int], share: float) -> int | None:
    """The reference: every m from the largest count down, the first that fits."""
    if len(counts) * share < 1.0 - 1e-9:
        return None
    top = max(counts.values())
    for m in range(top, 0, -1):
        if m <= share * sum(min(c, m) for c in counts.values()):
            return None if m == top else m
    raise AssertionError("m = 1 always fits")


def test_allowance_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(500):
        counts = {f"u{i}": rng.choice([1, 2, 5, 20, 300]) for i in range(rng.randint(1, 30))}
        share = rng.choice([0.01, 0.05, 0.1, 0.3, 1.0])
        assert allowance(counts, share) == brute_allowance(counts, share), (counts, share)


def test_allowance_cases() -> None:
    honest = {f"u{i}": 20 for i in range(10)}
    assert allowance(honest, 0.1) is None  # equal shares: nobody cut
    assert allowance({"a": 20, "b": 20, "c": 20}, 0.1) is None
    assert allowance({"a": 1000, "b": 10}, 0.1) is None  # fewer users than 1/share: no cap
    assert allowance({"a": 1000, "b": 10}, 0.5) == 10
    flood = {**honest, "mallory": 10_000}
    m = allowance(flood, 0.1)
    assert m is not None and m <= 0.1 * (200 + m) and m >= 20  # honest users keep all
    assert allowance({"a": 1000, "b": 10}, 1.0) is None


def test_caps_must_be_shares() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_user_share"):
            SourceCaps(max_user_share=bad)


def test_majority_agreement_by_hand() -> None:
    a = MajorityAgreement()
    # three users rank x > y > z; one ranks z > y > x; one judges a pair nobody else saw
    for u in ("u1", "u2", "u3"):
        a.add("c1", u, ["x", "y", "z"], [1, 2, 3])
    a.add("c1", "odd", ["z", "y", "x"], [1, 2, 3])
    a.add("c2", "alone", ["p", "q"], [1, 2])
    got = a.per_user()
    assert got["odd"] == {"judged": 3, "agreement": 0.0}
    assert got["u1"] == {"judged": 3, "agreement": 1.0}
    assert "alone" not in got


@pytest.fixture
async def store(redis_client: Any, redis_url: str) -> AsyncIterator[FeedbackStore]:
    s = FeedbackStore.from_url(redis_url, StoreConfig(rate_limit_per_minute=0))
    yield s
    await s.close()


async def test_one_user_flooding_the_snapshot_cannot_exceed_the_cap(
    store: FeedbackStore, redis_url: str, tmp_path: Path
) -> None:
    honest = [f"user-{i}" for i in range(10)]
    fids: dict[str, list[str]] = {u: [] for u in [*honest, "mallory"]}
    for i in range(20 * len(honest) + 600):  # 10 users x 20 rankings, then a flood of 600
        user = honest[i % len(honest)] if i < 20 * len(honest) else "mallory"
        rec = make_completion(4, prompt=f"Prompt {i}.")
        await store.log_completion(rec)
        r = ids(rec)
        order = r if user != "mallory" else r[::-1]  # the flood prefers what others reject
        ack = await store.submit_ranking(
            user_id=user, idempotency_key=f"k{i}", completion_id=rec.completion_id,
            ranked_response_ids=order,
        )  # fmt: skip
        fids[user].append(ack.feedback_id)
    shared = make_completion(2, prompt="Judged by many.")
    await store.log_completion(shared)
    a, b = ids(shared)
    for user, order in (*((u, [a, b]) for u in honest[:3]), ("mallory", [b, a])):
        ack = await store.submit_ranking(
            user_id=user, idempotency_key=None, completion_id=shared.completion_id,
            ranked_response_ids=order,
        )  # fmt: skip
        fids[user].append(ack.feedback_id)

    m = export_snapshot(redis_url, tmp_path / "snap", caps=SourceCaps(max_user_share=0.1))

    included = set(m.feedback_ids)
    kept = Counter({user: sum(f in included for f in fs) for user, fs in fids.items()})
    total_prefs = m.counts["ranking"] + m.counts["comparison"]
    assert total_prefs == sum(kept.values())
    assert 0 < kept["mallory"] <= 0.1 * total_prefs, (kept["mallory"], total_prefs)
    assert all(kept[u] == len(fids[u]) for u in honest)  # honest users lose nothing
    # the flood's first rankings are the ones kept
    assert [f for f in fids["mallory"] if f in included] == fids["mallory"][: kept["mallory"]]
    report = m.sources["users"]["mallory"]
    assert report["kept"] == kept["mallory"] == m.sources["caps"]["user"]
    assert report["dropped"] == len(fids["mallory"]) - kept["mallory"] > 500
    assert sorted(m.skipped["source_cap"]) == sorted(set(fids["mallory"]) - included)
    assert m.sources["users"]["user-0"]["agreement"] == 1.0
    assert m.sources["users"]["user-0"]["judged"] == 1  # the shared pair, against two others
    # the files hold no more than the manifest says
    rows = (tmp_path / "snap" / "rankings.jsonl").read_text().splitlines()
    assert len(rows) == total_prefs
