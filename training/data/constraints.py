"""Instruction prompts with verifiable constraints, checked by IFEval's own checkers.

The learning benchmark needs a judge that a program can run: a prompt such as "Write a short poem
about the moon. In your entire response, refrain from the use of any commas." together with a
checker that says whether a response obeys it. lm-eval ships IFEval's checkers
(`lm_eval.tasks.ifeval.instructions_registry`); we use them unchanged, and only choose which ones
and with which arguments.

Chosen checkers are the ones a 135M instruct model meets sometimes but not always (so there is
room to learn) and that need no nltk data: `number_sentences` (punkt) is left out.

Prompts are tasks ("Write a short poem about {subject}") × subjects × 1–3 constraints. The split
into train and held-out is by a hash of the subject, as the paper splits by user id (§3.2), so
held-out prompts are about subjects the policy never trained on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

Split = Literal["train", "heldout"]

# Task templates: general instructions of the kinds the paper's API prompts hold (§3.2, Table 1:
# generation, open QA, brainstorming, explanation).
TASKS: tuple[str, ...] = (
    "Write a short blog post about {s}.",
    "Explain {s} to a ten-year-old.",
    "Describe {s} in a few sentences.",
    "Write a short story that involves {s}.",
    "Give some practical tips about {s}.",
    "Write a short poem about {s}.",
    "Why does {s} matter? Answer briefly.",
    "Write a short note to a friend about {s}.",
)

# The split groups (the paper's "user id"). 48 subjects; ~20% go to held-out.
SUBJECTS: tuple[str, ...] = (
    "the ocean", "coffee", "bicycles", "the moon", "gardening", "a rainy day",
    "learning a new language", "volcanoes", "honey bees", "public libraries", "bread",
    "a city at night", "recycling", "chess", "the human heart", "friendship", "winter mornings",
    "trains", "solar energy", "a lost umbrella", "cats", "mountain hiking", "the internet",
    "music lessons", "a summer festival", "rivers", "time management", "a friendly robot",
    "the desert", "birthday parties", "cooking pasta", "the stars", "a small bakery",
    "electric cars", "forests", "kindness", "an old lighthouse", "dogs", "football",
    "the first day of school", "clouds", "a market in the morning", "sleep", "maps",
    "photography", "snow", "a long train journey", "tea",
)  # fmt: skip

# Words a response must include (keywords:existence): plain words that fit most tasks.
KEYWORDS: tuple[str, ...] = (
    "bright", "quiet", "simple", "morning", "journey", "garden", "window", "gentle", "history",
    "future", "river", "smile", "careful", "golden", "paper", "friend", "energy", "balance",
)  # fmt: skip

# Words a response must avoid (keywords:forbidden_words): words the model uses often unasked.
FORBIDDEN: tuple[str, ...] = (
    "very", "also", "many", "important", "like", "really", "great", "just", "can", "your",
)  # fmt: skip

END_PHRASES: tuple[str, ...] = (
    "Any other questions?",  # IFEval's own options
    "Is there anything else I can help with?",
    "That is all.",
)

# The IFEval instruction ids we use (all in lm-eval's INSTRUCTION_DICT).
DEFAULT_INSTRUCTIONS: tuple[str, ...] = (
    "change_case:english_lowercase",
    "punctuation:no_comma",
    "startend:end_checker",
    "keywords:existence",
    "keywords:forbidden_words",
    "length_constraints:number_words",
    "detectable_format:title",
    "detectable_format:number_bullet_lists",
    "detectable_content:postscript",
    "startend:quotation",
)


@dataclass(frozen=True)
class ConstraintConfig:
    """How prompts are drawn. Defaults are ours (the paper's prompts came from API users)."""

    # Which IFEval checkers to draw from.
    instructions: tuple[str, ...] = DEFAULT_INSTRUCTIONS
    # P(1, 2, 3 constraints): mostly single constraints, so the 135M model starts well above 0%
    # prompt-level accuracy and below 100%.
    n_constraints_weights: tuple[float, float, float] = (0.5, 0.35, 0.15)
    # Share of subjects held out (the paper splits train/validation/test by user id, §3.2).
    heldout_percent: int = 20
    # Salt of the split hash: change it to draw a different split.
    split_salt: str = "instructloop-split-v1"
    # length_constraints:number_words: "less than N" and "at least N" choices. Small numbers on
    # purpose: rollouts are short (tens to a few hundred tokens) on a CPU.
    words_less_than: tuple[int, ...] = (20, 30, 50)
    words_at_least: tuple[int, ...] = (40, 60)
    # detectable_format:number_bullet_lists: exact bullet counts.
    bullet_counts: tuple[int, ...] = (2, 3, 4)

    def __post_init__(self) -> None:
        ifeval = _ifeval()
        unknown = [i for i in self.instructions if i not in ifeval.registry.INSTRUCTION_DICT]
        if unknown:
            raise ValueError(f"unknown IFEval instruction ids: {unknown}")
        if "length_constraints:number_sentences" in self.instructions:
            raise ValueError("length_constraints:number_sentences needs nltk punkt (not here)")
        if len(self.n_constraints_weights) != 3 or min(self.n_constraints_weights) < 0:
            raise ValueError("n_constraints_weights: three non-negative weights for 1, 2, 3")
        if sum(self.n_constraints_weights) <= 0:
            raise ValueError("n_constraints_weights must not all be 0")
        if not 0 < self.heldout_percent < 100:
            raise ValueError("heldout_percent must be in (0, 100)")


@dataclass(frozen=True)
class ConstraintPrompt:
    """One prompt with its verifiable instructions (IFEval's record layout)."""

    id: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    subject: str = ""
    split: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "instruction_ids": list(self.instruction_ids),
            "kwargs": [dict(k) for k in self.kwargs],
            "subject": self.subject,
            "split": self.split,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ConstraintPrompt:
        try:
            ids = tuple(str(i) for i in row["instruction_ids"])
            kwargs = tuple(dict(k) for k in row["kwargs"])
            p = cls(
                id=str(row["id"]),
                prompt=str(row["prompt"]),
                instruction_ids=ids,
                kwargs=kwargs,
                subject=str(row.get("subject", "")),
                split=str(row.get("split", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a constraint prompt row: {e!r}") from e
        if len(p.instruction_ids) != len(p.kwargs):
            raise ValueError(f"{p.id}: {len(p.instruction_ids)} ids but {len(p.kwargs)} kwargs")
        return p


@dataclass(frozen=True)
class _IFEval:
    registry: ModuleType
    utils: ModuleType


@functools.cache
def _ifeval() -> _IFEval:
    """Import lm-eval's IFEval modules without their network side effect.

    `instructions_util` calls `nltk.download("punkt_tab")` at import when punkt is missing; there
    is no network here, and none of our checkers uses punkt, so the download is skipped.
    langdetect (used by the lowercase checker) is random unless seeded: seed it so a score is a
    function of the response.
    """
    import langdetect
    import nltk

    langdetect.DetectorFactory.seed = 0
    real_download = nltk.download
    nltk.download = lambda *a, **k: False  # type: ignore[assignment]
    try:
        with contextlib.redirect_stdout(None):
            from lm_eval.tasks.ifeval import instructions_registry, utils
    finally:
        nltk.download = real_download  # type: ignore[assignment]
    return _IFEval(registry=instructions_registry, utils=utils)


def _conflicts(a: str, b: str) -> bool:
    c = _ifeval().registry.INSTRUCTION_CONFLICTS
    return a == b or b in c.get(a, set()) or a in c.get(b, set())


def split_of(subject: str, cfg: ConstraintConfig | None = None) -> Split:
    """Train or held-out, by a stable hash of the subject (the split group)."""
    cfg = cfg or ConstraintConfig()
    h = hashlib.sha256(f"{cfg.split_salt}:{subject}".encode()).digest()
    return "heldout" if int.from_bytes(h[:8], "big") % 100 < cfg.heldout_percent else "train"


def subjects(split: Split, cfg: ConstraintConfig | None = None) -> list[str]:
    return [s for s in SUBJECTS if split_of(s, cfg) == split]


def _draw_kwargs(rng: random.Random, iid: str, cfg: ConstraintConfig) -> dict[str, Any]:
    """Explicit arguments for one checker (so no checker draws from the global `random`)."""
    if iid == "keywords:existence":
        return {"keywords": sorted(rng.sample(KEYWORDS, rng.choice((1, 2))))}
    if iid == "keywords:forbidden_words":
        return {"forbidden_words": sorted(rng.sample(FORBIDDEN, 2))}
    if iid == "length_constraints:number_words":
        relation = rng.choice(("less than", "at least"))
        n = rng.choice(cfg.words_less_than if relation == "less than" else cfg.words_at_least)
        return {"num_words": n, "relation": relation}
    if iid == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.choice(cfg.bullet_counts)}
    if iid == "startend:end_checker":
        return {"end_phrase": rng.choice(END_PHRASES)}
    if iid == "detectable_content:postscript":
        return {"postscript_marker": "P.S."}
    return {}  # checkers without arguments (lowercase, no_comma, title, quotation)


def _description(iid: str, kwargs: dict[str, Any]) -> str:
    checker = _ifeval().registry.INSTRUCTION_DICT[iid](iid)
    return str(checker.build_description(**kwargs))


def prompt_id(prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any]]) -> str:
    blob = json.dumps([prompt, list(instruction_ids), list(kwargs)], sort_keys=True)
    return "cp-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_prompt(
    task: str,
    subject: str,
    instruction_ids: Sequence[str],
    kwargs: Sequence[dict[str, Any]],
    cfg: ConstraintConfig | None = None,
) -> ConstraintPrompt:
    """Build one prompt: the task, then each instruction's IFEval description."""
    if len(instruction_ids) != len(kwargs):
        raise ValueError("instruction_ids and kwargs differ in length")
    parts = [task.format(s=subject)]
    parts += [_description(i, k) for i, k in zip(instruction_ids, kwargs, strict=True)]
    text = " ".join(parts)
    ids, kws = tuple(instruction_ids), tuple(dict(k) for k in kwargs)
    return ConstraintPrompt(
        id=prompt_id(text, ids, kws), prompt=text, instruction_ids=ids, kwargs=kws,
        subject=subject, split=split_of(subject, cfg),
    )  # fmt: skip


def generate_prompts(
    n: int, split: Split, *, seed: int = 0, cfg: ConstraintConfig | None = None
) -> list[ConstraintPrompt]:
    """`n` distinct prompts of one split; the same (n, split, seed, cfg) gives the same list."""
    cfg = cfg or ConstraintConfig()
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    if n < 0:
        raise ValueError("n must be >= 0")
    pool = subjects(split, cfg)
    rng = random.Random(f"{seed}:{split}")
    out: dict[str, ConstraintPrompt] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} prompts from this config")
        k = rng.choices((1, 2, 3), weights=cfg.n_constraints_weights)[0]
        ids: list[str] = []
        for iid in rng.sample(cfg.instructions, len(cfg.instructions)):
            if len(ids) == k:
                break
            if not any(_conflicts(iid, j) for j in ids):
                ids.append(iid)
        kwargs = [_draw_kwargs(rng, i, cfg) for i in ids]
        p = make_prompt(rng.choice(TASKS), rng.choice(pool), ids, kwargs, cfg)
        out.setdefault(p.id, p)
    return list(out.values())


def follows(prompt: ConstraintPrompt, response: str) -> list[bool]:
    """Per instruction: does `response` follow it? IFEval's strict test, unchanged."""
    u = _ifeval().utils
    inp = u.InputExample(
        key=0,
        instruction_id_list=list(prompt.instruction_ids),
        prompt=prompt.prompt,
        kwargs=[dict(k) for k in prompt.kwargs],
    )
    return [
        bool(x) for x in u.test_instruction_following_strict(inp, response).follow_instruction_list
    ]


def score(prompt: ConstraintPrompt, response: str) -> tuple[int, int]:
    """(instructions followed, instructions in the prompt)."""
    f = follows(prompt, response)
    return sum(f), len(f)


@dataclass(frozen=True)
class IFEvalAccuracy:
    """IFEval's two strict metrics: all instructions of a prompt met, and each one met."""

    prompt_level: float
    instruction_level: float
    n_prompts: int
    n_instructions: int
    per_instruction: dict[str, float] = field(default_factory=dict)
    per_prompt: tuple[bool, ...] = ()
    """Whether each prompt met all its instructions, in the order scored (for paired
    comparisons of two policies on the same prompts)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_level": self.prompt_level,
            "instruction_level": self.instruction_level,
            "n_prompts": self.n_prompts,
            "n_instructions": self.n_instructions,
            "per_instruction": dict(self.per_instruction),
            "per_prompt": [int(x) for x in self.per_prompt],
        }


@dataclass(frozen=True)
class PairedGain:
    """Prompt-level accuracy of B minus A on the same prompts, with its paired standard error:
    the spread of the per-prompt differences (+1 gained, -1 lost, 0 same), not of either
    accuracy, so the noise of which prompts are easy cancels."""

    points: float
    standard_error_points: float
    gained: int
    lost: int
    n_prompts: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paired_gain(before: IFEvalAccuracy, after: IFEvalAccuracy) -> PairedGain:
    """`after` minus `before` in prompt-level points, both scored on the same prompts."""
    a, b = before.per_prompt, after.per_prompt
    if len(a) != len(b) or not a:
        raise ValueError(f"need per-prompt results on the same prompts, got {len(a)} and {len(b)}")
    d = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return PairedGain(
        # From the counts: 100 * 20 / 200 is exactly 10.0, where 100 * (0.375 - 0.275) of the
        # two accuracies is 9.999... and would miss a ">= 10" target.
        points=100 * sum(d) / n,
        standard_error_points=100 * (var / n) ** 0.5,
        gained=d.count(1),
        lost=d.count(-1),
        n_prompts=n,
    )


def accuracy(prompts: Sequence[ConstraintPrompt], responses: Sequence[str]) -> IFEvalAccuracy:
    """Prompt-level and instruction-level strict accuracy of `responses[i]` to `prompts[i]`."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("no prompts to score")
    per_prompt: list[bool] = []
    met: dict[str, list[bool]] = {}
    for p, r in zip(prompts, responses, strict=True):
        f = follows(p, r)
        per_prompt.append(all(f))
        for iid, ok in zip(p.instruction_ids, f, strict=True):
            met.setdefault(iid, []).append(ok)
    flat = [ok for v in met.values() for ok in v]
    return IFEvalAccuracy(
        prompt_level=sum(per_prompt) / len(prompts),
        instruction_level=sum(flat) / len(flat),
        n_prompts=len(prompts),
        n_instructions=len(flat),
        per_instruction={k: sum(v) / len(v) for k, v in sorted(met.items())},
        per_prompt=tuple(per_prompt),
    )


def save_prompts(path: str | Path, prompts: Iterable[ConstraintPrompt]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for p in prompts:
            f.write(json.dumps(p.to_json()) + "\n")
    tmp.replace(path)
    return path


def load_prompts(path: str | Path) -> list[ConstraintPrompt]:
    return list(iter_prompts(path))


def iter_prompts(path: str | Path) -> Iterator[ConstraintPrompt]:
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield ConstraintPrompt.from_json(json.loads(line))
            except (ValueError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
