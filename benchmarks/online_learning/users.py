"""The simulated users: they ask for K candidates of training prompts, rank them by IFEval
instructions followed (ties kept) and submit the rankings; during a cycle they keep asking."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from benchmarks.online_learning.client import Session
from instructloop.training.data.simulated_labeler import rank, ranking_order


def all_tied(ranks: Sequence[int]) -> bool:
    """Every candidate shares one rank: the group holds no comparison to learn from."""
    return len(set(ranks)) <= 1


async def rank_and_submit(
    s: Session, i: int, p: Any, tag: str, stats: dict[str, Any], phase: str
) -> None:
    """A simulated user asks for K candidates and ranks them (ties kept)."""
    cfg = s.cfg
    user = f"user-{i % cfg.users}"
    req = s.request(
        p.prompt, n=cfg.k, max_tokens=cfg.sample_max_tokens,
        temperature=cfg.sample_temperature, user_id=user,
    )  # fmt: skip
    resp = await s.complete(req, phase)
    texts = [ch.text for ch in resp.choices]
    r = rank(p, texts)
    stats["versions"][resp.model_version] += 1
    stats["instructions_met"] += sum(r.scores)
    stats["instructions_sampled"] += len(p.instruction_ids) * len(texts)
    order, ranks = ranking_order(texts, r.responses, r.ranks)
    if all_tied(ranks):
        stats["all_tied"] += 1
        return
    sub = s.f.SubmitRankingRequest(
        user_id=user, idempotency_key=f"{tag}-{i}", completion_id=resp.completion_id,
        ranked_response_ids=[resp.choices[j].response_id for j in order], ranks=ranks,
    )  # fmt: skip
    for attempt in range(3):  # the idempotency key makes a retry safe
        try:
            await s.feedback.SubmitRanking(sub, metadata=s.user_md, timeout=cfg.request_timeout_s)
            break
        except Exception as e:
            s.failures.add(f"{phase}_submit", e)
            if attempt == 2:
                raise
            await asyncio.sleep(1.0)
    if stats["first_ack_at"] is None:
        stats["first_ack_at"] = time.time()
    stats["rankings"] += 1


async def collect_feedback(s: Session, prompts: Sequence[Any], tag: str) -> dict[str, Any]:
    """One round: each prompt asked for and ranked, `concurrency` at once; the round's counts."""
    sem = asyncio.Semaphore(s.cfg.concurrency)
    stats: dict[str, Any] = {
        "prompts": len(prompts), "rankings": 0, "all_tied": 0, "first_ack_at": None,
        "versions": Counter(), "instructions_met": 0, "instructions_sampled": 0,
    }  # fmt: skip
    t = time.time()

    async def guarded(i: int, p: Any) -> None:
        async with sem:
            await rank_and_submit(s, i, p, tag, stats, "feedback")

    await asyncio.gather(*(guarded(i, p) for i, p in enumerate(prompts)))
    stats["seconds"] = time.time() - t
    stats["versions"] = dict(stats["versions"])
    return stats


async def user_traffic(s: Session, prompts: Sequence[Any], stop: asyncio.Event) -> int:
    """Users keep asking (K candidates, logged) while the cycle runs; no feedback is sent,
    so the data the cycle trains on stays the snapshot's."""
    n = 0
    while not stop.is_set():
        p = prompts[n % len(prompts)]
        req = s.request(
            p.prompt, n=s.cfg.k, max_tokens=s.cfg.sample_max_tokens,
            temperature=s.cfg.sample_temperature, user_id=f"user-{n % s.cfg.users}",
        )  # fmt: skip
        try:
            await s.completion.Complete(req, metadata=s.user_md, timeout=s.cfg.request_timeout_s)
        except Exception as e:
            s.failures.add("cycle_traffic", e)
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), s.cfg.cycle_request_interval_s)
    return n
