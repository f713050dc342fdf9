"""Drawing prompts: a task, a subject and 1-3 compatible constraints, all from one side."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from instructloop.training.data.constraints.config import ConstraintConfig
from instructloop.training.data.constraints.families import (
    END_PHRASES,
    FORBIDDEN,
    KEYWORDS,
    RATIONED,
    conflicts,
)
from instructloop.training.data.constraints.heldout import split_of, subjects
from instructloop.training.data.constraints.records import ConstraintPrompt, prompt_id
from instructloop.training.data.constraints.templates import Split, tasks
from instructloop.training.data.constraints.wording import IFEVAL_PHRASING, describe, phrasings


def draw_kwargs(rng: random.Random, iid: str, cfg: ConstraintConfig) -> dict[str, Any]:
    """Explicit arguments for one checker (so no checker draws from the global `random`)."""
    if iid == "keywords:existence":
        return {"keywords": sorted(rng.sample(KEYWORDS, rng.choice((1, 2))))}
    if iid == "keywords:forbidden_words":
        return {"forbidden_words": sorted(rng.sample(FORBIDDEN, 2))}
    if iid == "keywords:frequency":
        if rng.random() < 0.5:
            word, n = rng.choice(KEYWORDS), rng.choice(cfg.frequency_at_least)
            return {"keyword": word, "frequency": n, "relation": "at least"}
        word, n = rng.choice(RATIONED), rng.choice(cfg.frequency_less_than)
        return {"keyword": word, "frequency": n, "relation": "less than"}
    if iid == "length_constraints:number_words":
        relation = rng.choice(("less than", "at least"))
        n = rng.choice(cfg.words_less_than if relation == "less than" else cfg.words_at_least)
        return {"num_words": n, "relation": relation}
    if iid == "length_constraints:number_paragraphs":
        return {"num_paragraphs": rng.choice(cfg.paragraph_counts)}
    if iid == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.choice(cfg.bullet_counts)}
    if iid == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.choice(cfg.highlight_counts)}
    if iid == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.choice(cfg.placeholder_counts)}
    if iid == "detectable_format:multiple_sections":
        return {"section_spliter": "SECTION", "num_sections": rng.choice(cfg.section_counts)}
    if iid == "startend:end_checker":
        return {"end_phrase": rng.choice(END_PHRASES)}
    if iid == "detectable_content:postscript":
        return {"postscript_marker": "P.S."}
    return {}  # checkers without arguments (case, no_comma, title, quotation)


def make_prompt(
    task: str,
    subject: str,
    instruction_ids: Sequence[str],
    kwargs: Sequence[dict[str, Any]],
    cfg: ConstraintConfig | None = None,
    *,
    phrasings: Sequence[str] | None = None,
) -> ConstraintPrompt:
    """Build one prompt: the task, then each instruction's text.

    `phrasings` holds one phrasing key per instruction (see `phrasings()`); None words every
    instruction with IFEval's own description.
    """
    if len(instruction_ids) != len(kwargs):
        raise ValueError("instruction_ids and kwargs differ in length")
    keys = (
        tuple(f"{i}/{IFEVAL_PHRASING}" for i in instruction_ids)
        if phrasings is None
        else tuple(phrasings)
    )
    if len(keys) != len(instruction_ids):
        raise ValueError("instruction_ids and phrasings differ in length")
    parts = [task.format(s=subject)]
    parts += [describe(i, k, ph) for i, k, ph in zip(instruction_ids, kwargs, keys, strict=True)]
    text = " ".join(parts)
    ids, kws = tuple(instruction_ids), tuple(dict(k) for k in kwargs)
    return ConstraintPrompt(
        id=prompt_id(text, ids, kws), prompt=text, instruction_ids=ids, kwargs=kws,
        subject=subject, split=split_of(subject, cfg), task=task, phrasings=keys,
    )  # fmt: skip


def generate_prompts(
    n: int, split: Split, *, seed: int = 0, cfg: ConstraintConfig | None = None
) -> list[ConstraintPrompt]:
    """`n` distinct prompts of one split; the same (n, split, seed, cfg) gives the same list.

    Everything a prompt is made of comes from its own side: subject, task template, each
    instruction's phrasing, and (held out) the held-out-only instruction families.
    """
    cfg = cfg or ConstraintConfig()
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    if n < 0:
        raise ValueError("n must be >= 0")
    pool = subjects(split, cfg)
    templates = [t.template for t in tasks(split)]
    instructions = cfg.instructions_for(split)
    rng = random.Random(f"{seed}:{split}")
    out: dict[str, ConstraintPrompt] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} prompts from this config")
        k = rng.choices((1, 2, 3), weights=cfg.n_constraints_weights)[0]
        ids: list[str] = []
        for iid in rng.sample(instructions, len(instructions)):
            if len(ids) == k:
                break
            if not any(conflicts(iid, j) for j in ids):
                ids.append(iid)
        kwargs = [draw_kwargs(rng, i, cfg) for i in ids]
        keys = [rng.choice(phrasings(i, split)) for i in ids]
        task, subject = rng.choice(templates), rng.choice(pool)
        p = make_prompt(task, subject, ids, kwargs, cfg, phrasings=keys)
        out.setdefault(p.id, p)
    return list(out.values())
