"""Simulated users: judge an answer as a person would, not only as a checker does.

Counting the IFEval checks an answer meets (training/data/constraints/) rewards reflexes: a
policy trained on that count alone added a P.S. and a <<title>> to answers that asked for neither,
answered a two-keyword request with "P.S. I hope this helps!", and shortened answers until some
held nothing. A person who asks for a story with two given words wants a story that has them;
formatting nobody asked for is a fault, and a near-empty answer is no answer, whatever checks it
happens to pass. So a simulated user scores an answer on three parts:

- met: how many of the prompt's constraints it follows (IFEval's strict checkers, unchanged);
- unrequested formatting (`unrequested_formatting`): each feature of FORMATTING_FEATURES present
  that neither a constraint of the prompt nor its task asked for costs FORMATTING_PENALTY (half a
  constraint): the same answer without the feature ranks above it, and meeting one more
  constraint is still worth more than leaving one feature out;
- degenerate (`degenerate_reasons`): far too short for the task, not about the prompt's subject,
  or repeating itself. Such an answer ranks below every answer that is not degenerate.

    quality = met - FORMATTING_PENALTY * len(unrequested) - (offset if degenerate else 0)
    offset  = n_constraints + FORMATTING_PENALTY * len(FORMATTING_FEATURES) + 1

The offset exceeds the widest spread the other two parts can have on one prompt, so the order is
lexicographic: (not degenerate, met - formatting penalties). Degenerate answers still order among
themselves by the rest. Every term is a multiple of 0.5, so equal quality is an exact tie, and
ties stay ties (equal rank).

The rules are simple on purpose, and lean towards not finding a fault (a false fault costs a good
answer its rank):

- postscript: "P.S." or "P.P.S." (any case) starting a line or following a space;
- title: `<<...>>` on one line (IFEval's own title pattern);
- bullet_list: two or more lines that start with a markdown bullet (`*`, `-`, `+`, `•`, then a
  space) or a number ("1." or "1)"); tasks that ask for tips or dos and don'ts allow lists
  (constraints.Task.allows);
- quotation: the whole answer, stripped, starts and ends with a double quote (straight or curly);
- lowercase / all_caps: at least 5 words and no upper-case (lower-case) letter, the P.S. marker
  aside;
- too_short: fewer words in the body (the answer less its <<title>>, its P.S. and what follows, and
  a requested end phrase) than the task's `min_words` (8), lowered for a "less than N words"
  request to max(3, N // 4);
- off_topic: no content word of the subject appears, words compared by crude stems (plural, -ing
  and -ed endings off; one stem a prefix of the other counts);
- repeated_lines / repeated_sentences: a line or sentence of 3 words or more occurs twice (case,
  punctuation and bullet markers ignored);
- repetitive: 10 or more word 4-grams, of which 30% or more repeat an earlier one.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from instructloop.training.data.constraints import (
    ConstraintPrompt,
    follows,
    per_instruction_accuracy,
    task_of,
)

# Formatting features a person notices, and the constraints that ask for each.
FORMATTING_FEATURES: dict[str, frozenset[str]] = {
    "postscript": frozenset({"detectable_content:postscript"}),
    "title": frozenset({"detectable_format:title"}),
    "bullet_list": frozenset({"detectable_format:number_bullet_lists"}),
    "quotation": frozenset({"startend:quotation"}),
    "lowercase": frozenset({"change_case:english_lowercase"}),
    "all_caps": frozenset({"change_case:english_capital"}),
}
FORMATTING_PENALTY = 0.5
DEGENERATE_REASONS: tuple[str, ...] = (
    "too_short",
    "off_topic",
    "repeated_lines",
    "repeated_sentences",
    "repetitive",
)
DEFAULT_MIN_WORDS = 8  # for prompts whose task is not in constraints.TASK_SET
SHORT_ANSWER_WORDS = 8  # answer_words' "share under" threshold
# A case is a style only over a sentence or so: "I SEE" or "ok, thanks" are not case changes.
CASE_MIN_WORDS = 5

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_PS = re.compile(r"(?:^|(?<=\s))p\.\s?(?:p\.\s?)?s\.", re.IGNORECASE | re.MULTILINE)
_TITLE = re.compile(r"<<[^\n]+>>")
_BULLET = re.compile(r"^[ \t]*(?:[*+•-]|\d{1,2}[.)])[ \t]+\S", re.MULTILINE)
_BULLET_MARK = re.compile(r"^\s*(?:[*+•-]|\d{1,2}[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_STOPWORDS = frozenset({
    "a", "an", "the", "of", "at", "in", "on", "to", "for", "from", "and", "or", "with", "by",
    "my", "our", "your", "its", "their", "this", "that",
})  # fmt: skip


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _has_postscript(r: str) -> bool:
    return _PS.search(r) is not None


def _has_title(r: str) -> bool:
    return any(t.strip("<>").strip() for t in _TITLE.findall(r))


def _has_bullet_list(r: str) -> bool:
    return len(_BULLET.findall(r)) >= 2


def _is_quoted(r: str) -> bool:
    s = r.strip()
    return len(s) > 1 and s[0] in '"“' and s[-1] in '"”'


def _case_words(r: str) -> tuple[str, list[str]]:
    text = _PS.sub(" ", r)  # "P.S." is upper case by convention, in any answer
    return text, [w for w in _words(text) if any(c.isalpha() for c in w)]


def _is_lowercase(r: str) -> bool:
    text, words = _case_words(r)
    return len(words) >= CASE_MIN_WORDS and not any(c.isupper() for c in text)


def _is_all_caps(r: str) -> bool:
    text, words = _case_words(r)
    return len(words) >= CASE_MIN_WORDS and not any(c.islower() for c in text)


_DETECTORS: dict[str, Callable[[str], bool]] = {
    "postscript": _has_postscript,
    "title": _has_title,
    "bullet_list": _has_bullet_list,
    "quotation": _is_quoted,
    "lowercase": _is_lowercase,
    "all_caps": _is_all_caps,
}


def requested_formatting(prompt: ConstraintPrompt) -> set[str]:
    """Formatting features the prompt asks for or allows: by a constraint, or by its task."""
    ids = set(prompt.instruction_ids)
    task = task_of(prompt.task)
    allowed = set(task.allows) if task else set()
    return allowed | {name for name, asks in FORMATTING_FEATURES.items() if asks & ids}


def unrequested_formatting(prompt: ConstraintPrompt, response: str) -> list[str]:
    """Names of the formatting features `response` shows that `prompt` did not ask for."""
    asked = requested_formatting(prompt)
    return [n for n, found in _DETECTORS.items() if n not in asked and found(response)]


def min_words(prompt: ConstraintPrompt) -> int:
    """Fewest body words an answer to `prompt` may have before it is no answer to the task."""
    task = task_of(prompt.task)
    n = task.min_words if task else DEFAULT_MIN_WORDS
    for iid, kw in zip(prompt.instruction_ids, prompt.kwargs, strict=True):
        if iid == "length_constraints:number_words" and kw.get("relation") == "less than":
            n = min(n, max(3, int(kw["num_words"]) // 4))
    return n


def body(prompt: ConstraintPrompt, response: str) -> str:
    """The answer's content: without its <<title>>, its P.S. (and what follows) and a requested
    end phrase. Those satisfy checkers; they do not answer the task."""
    text = _TITLE.sub(" ", response)
    m = _PS.search(text)
    if m is not None:
        text = text[: m.start()]
    for iid, kw in zip(prompt.instruction_ids, prompt.kwargs, strict=True):
        phrase = str(kw.get("end_phrase") or "").strip().lower()
        if iid == "startend:end_checker" and phrase:
            stripped = text.rstrip().rstrip('"').rstrip()
            if stripped.lower().endswith(phrase):
                text = stripped[: len(stripped) - len(phrase)]
    return text


def _stem(word: str) -> str:
    w = word.lower()
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", ""), ("ing", ""), ("ed", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            return w[: -len(suffix)] + repl
    return w


def _content_stems(text: str) -> set[str]:
    return {_stem(w) for w in _words(text.lower()) if w not in _STOPWORDS}


def on_topic(subject: str, response: str) -> bool:
    """Does a content word of `subject` appear in `response`? (True for an empty subject.)"""
    keys = _content_stems(subject)
    if not keys:
        return True
    for s in _content_stems(response):
        for k in keys:
            short, long_ = sorted((s, k), key=len)
            if s == k or (len(short) >= 3 and long_.startswith(short)):
                return True
    return False


def _normalised(segment: str) -> str:
    return " ".join(_words(_BULLET_MARK.sub("", segment).lower()))


def _repeats(segments: Sequence[str]) -> bool:
    seen: set[str] = set()
    for s in segments:
        n = _normalised(s)
        if len(n.split()) < 3:
            continue
        if n in seen:
            return True
        seen.add(n)
    return False


def repeated_ngram_share(response: str, n: int = 4) -> float:
    """Share of the word n-grams of `response` that repeat an earlier one (0 with none)."""
    w = [x.lower() for x in _words(response)]
    grams = list(zip(*(w[i:] for i in range(n)), strict=False))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def degenerate_reasons(prompt: ConstraintPrompt, response: str) -> list[str]:
    """Why `response` is no real answer to `prompt` (names from DEGENERATE_REASONS), or []."""
    out = []
    if len(_words(body(prompt, response))) < min_words(prompt):
        out.append("too_short")
    if not on_topic(prompt.subject, response):
        out.append("off_topic")
    if _repeats(response.splitlines()):
        out.append("repeated_lines")
    if _repeats(_SENTENCE_END.split(response)):
        out.append("repeated_sentences")
    w = _words(response)
    if len(w) >= 13 and repeated_ngram_share(response) >= 0.3:  # 13 words: 10 4-grams
        out.append("repetitive")
    return out


def is_degenerate(prompt: ConstraintPrompt, response: str) -> str | None:
    """The first reason `response` is degenerate (see `degenerate_reasons`), or None."""
    reasons = degenerate_reasons(prompt, response)
    return reasons[0] if reasons else None


def degenerate_offset(prompt: ConstraintPrompt) -> float:
    """What a degenerate answer loses: more than the other parts can differ on this prompt."""
    return len(prompt.instruction_ids) + FORMATTING_PENALTY * len(FORMATTING_FEATURES) + 1


@dataclass(frozen=True)
class Judgement:
    """One answer judged, with its parts (see the module docstring for how they combine)."""

    met: int
    n_constraints: int
    followed: tuple[bool, ...]
    unrequested: tuple[str, ...]
    degenerate: tuple[str, ...]
    quality: float
    degenerate_penalty: float = 0.0  # degenerate_offset(prompt) when degenerate, else 0

    @property
    def is_degenerate(self) -> bool:
        return bool(self.degenerate)

    @property
    def penalties(self) -> dict[str, float]:
        """What each fault cost, by name: unrequested features, and "degenerate"."""
        out = dict.fromkeys(self.unrequested, FORMATTING_PENALTY)
        if self.degenerate:
            out["degenerate"] = self.degenerate_penalty
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "met": self.met,
            "n_constraints": self.n_constraints,
            "followed": list(self.followed),
            "unrequested": list(self.unrequested),
            "degenerate": list(self.degenerate),
            "penalties": self.penalties,
            "quality": self.quality,
        }


def judge(prompt: ConstraintPrompt, response: str) -> Judgement:
    """How a simulated user judges `response` to `prompt`: constraints met, less penalties."""
    followed = tuple(follows(prompt, response))
    met = sum(followed)
    unrequested = tuple(unrequested_formatting(prompt, response))
    reasons = tuple(degenerate_reasons(prompt, response))
    offset = degenerate_offset(prompt) if reasons else 0.0
    return Judgement(
        met=met,
        n_constraints=len(followed),
        followed=followed,
        unrequested=unrequested,
        degenerate=reasons,
        quality=met - FORMATTING_PENALTY * len(unrequested) - offset,
        degenerate_penalty=offset,
    )


# --- reporting ------------------------------------------------------------------------------------


def _pairs(
    prompts: Sequence[ConstraintPrompt], answers: Sequence[str]
) -> list[tuple[ConstraintPrompt, str]]:
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no answers to report on")
    return list(zip(prompts, answers, strict=True))


def _requests_no_formatting(p: ConstraintPrompt) -> bool:
    asks = frozenset().union(*FORMATTING_FEATURES.values())
    return not asks & set(p.instruction_ids)


def unrequested_formatting_rate(
    prompts: Sequence[ConstraintPrompt], answers: Sequence[str]
) -> float:
    """Among prompts whose constraints ask for no formatting feature, the share of answers that
    show one anyway (a list where the task invites one is not counted)."""
    eligible = [(p, a) for p, a in _pairs(prompts, answers) if _requests_no_formatting(p)]
    if not eligible:
        raise ValueError("no prompt without a formatting constraint among these")
    return sum(bool(unrequested_formatting(p, a)) for p, a in eligible) / len(eligible)


def unrequested_formatting_by_feature(
    prompts: Sequence[ConstraintPrompt], answers: Sequence[str]
) -> dict[str, float]:
    """Per feature: among prompts that did not ask for it, the share of answers that show it."""
    pairs = _pairs(prompts, answers)
    out: dict[str, float] = {}
    for name in FORMATTING_FEATURES:
        eligible = [(p, a) for p, a in pairs if name not in requested_formatting(p)]
        if eligible:
            out[name] = sum(_DETECTORS[name](a) for _, a in eligible) / len(eligible)
    return out


def degenerate_rate(prompts: Sequence[ConstraintPrompt], answers: Sequence[str]) -> float:
    """Share of answers that are degenerate for their prompt."""
    pairs = _pairs(prompts, answers)
    return sum(bool(degenerate_reasons(p, a)) for p, a in pairs) / len(pairs)


def degenerate_by_reason(
    prompts: Sequence[ConstraintPrompt], answers: Sequence[str]
) -> dict[str, float]:
    """Per reason of DEGENERATE_REASONS: the share of answers it applies to (an answer can have
    several)."""
    pairs = _pairs(prompts, answers)
    found = [set(degenerate_reasons(p, a)) for p, a in pairs]
    return {r: sum(r in f for f in found) / len(found) for r in DEGENERATE_REASONS}


def answer_words(answers: Sequence[str]) -> dict[str, float]:
    """Answer length in whitespace-separated words: n, mean, median, share under 8 words."""
    if not answers:
        raise ValueError("no answers")
    n = [len(a.split()) for a in answers]
    return {
        "n": len(n),
        "mean": sum(n) / len(n),
        "median": float(statistics.median(n)),
        "share_under_8": sum(x < SHORT_ANSWER_WORDS for x in n) / len(n),
    }


def quality_report(prompts: Sequence[ConstraintPrompt], answers: Sequence[str]) -> dict[str, Any]:
    """Everything above for one set of answers, JSON-ready (the unrequested-formatting rate is
    None where every prompt asked for some formatting)."""
    pairs = _pairs(prompts, answers)
    try:
        rate: float | None = unrequested_formatting_rate(prompts, answers)
    except ValueError:
        rate = None
    judged = [judge(p, a) for p, a in pairs]
    return {
        "n": len(pairs),
        "per_instruction": per_instruction_accuracy(prompts, answers),
        "unrequested_formatting_rate": rate,
        "unrequested_formatting_by_feature": unrequested_formatting_by_feature(prompts, answers),
        "degenerate_rate": degenerate_rate(prompts, answers),
        "degenerate_by_reason": degenerate_by_reason(prompts, answers),
        "mean_quality": sum(j.quality for j in judged) / len(judged),
        "answer_words": answer_words(answers),
    }
