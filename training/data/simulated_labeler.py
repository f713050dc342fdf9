"""A simulated labeller: ranks K responses to a constraint prompt as a simulated user judges them.

It stands in for the paper's human labellers (§3.4) in the learning benchmark and in tests: given
K samples of one prompt, it orders them by quality, best first: the IFEval instructions followed,
less a penalty for each formatting feature nobody asked for, with degenerate answers (far too
short, off the subject, repeating themselves) below every other (training/data/simulated_users.py
says how the parts combine). Equal quality is a tie (equal rank), broken by nothing, so ties reach
the reward model as ties. Its output is the service's export layout (docs/INTERFACES.md), so the
training stages read simulated and real feedback the same way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructloop.training.data.constraints import ConstraintPrompt
from instructloop.training.data.simulated_users import Judgement, judge

SIMULATED_USER = "simulated-labeller"


@dataclass(frozen=True)
class Ranking:
    """K responses of one prompt, best first, with dense ranks (equal rank = tie).

    `scores` are the constraints each response met; the order and the ranks follow `quality`
    (constraints met less penalties), so sort by `ranks` or `quality`, not by `scores`.
    """

    prompt: ConstraintPrompt
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    scores: tuple[int, ...]  # constraints met, per response (same order)
    quality: tuple[float, ...] = ()  # the simulated user's quality, per response (same order)
    judgements: tuple[Judgement, ...] = ()  # each response's judgement, with its parts

    @property
    def all_tied(self) -> bool:
        return len(set(self.ranks)) == 1


def rank(prompt: ConstraintPrompt, responses: Sequence[str]) -> Ranking:
    """Order `responses` by the simulated user's quality, best first; equal quality shares a
    rank (1, 1, 2, ...).

    The sort is stable, so tied responses keep their sampled order: the order within a tie means
    nothing, and the ranks say so.
    """
    if len(responses) < 2:
        raise ValueError(f"a ranking needs K >= 2 responses, got {len(responses)}")
    js = [judge(prompt, r) for r in responses]
    order = sorted(range(len(responses)), key=lambda i: -js[i].quality)
    distinct = sorted({j.quality for j in js}, reverse=True)
    return Ranking(
        prompt=prompt,
        responses=tuple(responses[i] for i in order),
        ranks=tuple(distinct.index(js[i].quality) + 1 for i in order),
        scores=tuple(js[i].met for i in order),
        quality=tuple(js[i].quality for i in order),
        judgements=tuple(js[i] for i in order),
    )


def ranking_order(
    candidates: Sequence[str], ranked: Sequence[str], ranks: Sequence[int]
) -> tuple[list[int], list[int]]:
    """A ranking of candidate texts (best first, with dense ranks) as indexes into `candidates`,
    best first, and the ranks in that order. Candidates with the same text are distinct
    responses: each ranked text takes the first candidate of that text not taken yet, so two
    equal answers map to two response ids, never one twice."""
    if len(ranked) != len(candidates) or len(ranks) != len(ranked):
        raise ValueError(
            f"{len(candidates)} candidates, {len(ranked)} ranked texts, {len(ranks)} ranks"
        )
    free: dict[str, list[int]] = {}
    for i, text in enumerate(candidates):
        free.setdefault(text, []).append(i)
    order = []
    for text in ranked:
        slots = free.get(text)
        if not slots:
            raise ValueError(f"a ranked text is not among the candidates: {text[:60]!r}")
        order.append(slots.pop(0))
    return order, [int(r) for r in ranks]


def _hex32(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def ranking_row(r: Ranking, prompt_text: str, model_version: str) -> dict[str, Any]:
    """One rankings.jsonl row. Ids are derived from the content, so a rerun gives the same ids."""
    key = _hex32(r.prompt.id, model_version, *r.responses)
    return {
        "feedback_id": f"fb-{key}",
        "kind": "ranking",
        "completion_id": f"cmpl-{_hex32('cmpl', key)}",
        "model_version": model_version,
        "user_id": SIMULATED_USER,
        "prompt": r.prompt.prompt,
        "prompt_text": prompt_text,
        "response_ids": [f"resp-{_hex32('resp', key, str(i))}" for i in range(len(r.responses))],
        "responses": list(r.responses),
        "ranks": list(r.ranks),
    }


def preference_rows(row: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """A ranking expanded to its strictly ordered pairs (TRL style): (pairs, ties left out)."""
    pairs, ties = [], 0
    for i, j in itertools.combinations(range(len(row["responses"])), 2):
        if row["ranks"][i] == row["ranks"][j]:
            ties += 1
            continue
        w, l = (i, j) if row["ranks"][i] < row["ranks"][j] else (j, i)  # noqa: E741
        pairs.append({
            "prompt": row["prompt"],
            "chosen": row["responses"][w],
            "rejected": row["responses"][l],
            "feedback_id": row["feedback_id"],
            "completion_id": row["completion_id"],
        })  # fmt: skip
    return pairs, ties


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


@dataclass(frozen=True)
class ExportSummary:
    out_dir: Path
    counts: dict[str, int]
    all_tied_dropped: int
    tied_pairs_omitted: int


def write_export(
    out_dir: str | Path,
    rankings: Sequence[tuple[Ranking, str]],
    *,
    model_version: str,
    sft_rows: Sequence[dict[str, Any]] = (),
    ptx_rows: Sequence[dict[str, Any]] = (),
    prompt_rows: Sequence[dict[str, Any]] = (),
    drop_all_tied: bool = True,
    snapshot_id: str | None = None,
) -> ExportSummary:
    """Write an export directory as `instructloop feedback export` does (feedback/export.py).

    Files: manifest.json, rankings.jsonl, preferences.jsonl, sft.jsonl, ptx.jsonl and
    prompts.jsonl (PPO's prompt set: {"prompt", "prompt_text"}).

    `rankings` pairs each Ranking with the prompt text the engine saw. Groups in which every
    response tied carry no comparison; with `drop_all_tied` they are left out (and counted).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, dropped = [], 0
    for r, text in rankings:
        if drop_all_tied and r.all_tied:
            dropped += 1
            continue
        rows.append(ranking_row(r, text, model_version))
    prefs, ties = [], 0
    for row in rows:
        p, t = preference_rows(row)
        prefs += p
        ties += t
    counts = {
        "rankings.jsonl": _write_jsonl(out / "rankings.jsonl", rows),
        "preferences.jsonl": _write_jsonl(out / "preferences.jsonl", prefs),
        "sft.jsonl": _write_jsonl(out / "sft.jsonl", sft_rows),
        "ptx.jsonl": _write_jsonl(out / "ptx.jsonl", ptx_rows),
        "prompts.jsonl": _write_jsonl(out / "prompts.jsonl", prompt_rows),
    }
    ids = [row["feedback_id"] for row in rows]
    manifest = {
        "snapshot_id": snapshot_id or "sim-" + _hex32(*ids)[:16],
        "created_at": time.time(),
        "source": SIMULATED_USER,
        "feedback_ids": ids,
        "counts": counts,
        "tied_pairs_omitted": ties,
        "all_tied_groups_dropped": dropped,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return ExportSummary(out, counts, dropped, ties)
