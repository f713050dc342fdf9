"""Instruction prompts with verifiable constraints, checked by IFEval's own checkers.

The learning benchmark needs a judge that a program can run: a prompt such as "Write a short poem
about the moon. Do not use any commas in your answer." together with a checker that says whether a
response obeys it. lm-eval ships IFEval's checkers (`lm_eval.tasks.ifeval.instructions_registry`);
we use them unchanged, and only choose which ones, with which arguments, and how to word them.

Chosen checkers are the ones a 135M instruct model meets sometimes but not always (so there is
room to learn) and that need no nltk data: `number_sentences` (punkt) is left out. Each family is
asked for from both sides where it has two (lower and upper case; fewer than and at least N words;
a word at least N times and fewer than N times).

Prompts are a task ("Write a short poem about {subject}") × a subject × 1–3 constraints, each
constraint worded by one of several phrasings (`PHRASINGS`) written from the checker's arguments;
IFEval's own `build_description` text is one more phrasing. The arguments are what the checker
tests, so a paraphrase changes the wording and never the check.

Train and held-out prompts share nothing a policy could memorise:
- subjects: split by a hash of the subject, as the paper splits by user id (§3.2);
- task templates: each template belongs to one side, and some task families (a diary entry, a
  speech, an advertisement, a book review) exist only held out;
- phrasings: each instruction's phrasings are split into train and held-out ones (IFEval's own
  text is held out, so the held-out set also measures the benchmark's standard wording);
- instruction families: `HELDOUT_ONLY_INSTRUCTIONS` appear only in held-out prompts. They are few,
  so most of what the held-out set measures is families training saw, in words it never saw.
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


@dataclass(frozen=True)
class Task:
    """A task template ("{s}" is the subject) and what a reader of its answer expects."""

    template: str
    family: str
    split: Split
    min_words: int = 8
    """Fewer words than this is no answer to the task (see training/data/simulated_users.py)."""
    allows: frozenset[str] = frozenset()
    """Formatting features (simulated_users.FORMATTING_FEATURES) the task invites by itself:
    a list of tips is no formatting nobody asked for."""


_LIST_OK = frozenset({"bullet_list"})

# General instructions of the kinds the paper's API prompts hold (§3.2, Table 1: generation, open
# QA, brainstorming, explanation). Held-out templates reword training families and add families
# that training never sees. Wording differs from training/data/ptx.py's GENERAL_TASKS.
TASK_SET: tuple[Task, ...] = (
    Task("Write a short blog post about {s}.", "blog", "train"),
    Task("Draft a brief blog post on {s} for a general audience.", "blog", "train"),
    Task("Explain {s} to a ten-year-old.", "explanation", "train"),
    Task("Explain what makes {s} interesting.", "explanation", "train"),
    Task("Describe {s} in a few sentences.", "description", "train"),
    Task("Paint a picture of {s} in words.", "description", "train"),
    Task("Write a short story that involves {s}.", "story", "train"),
    Task("Tell a short tale with {s} in it.", "story", "train"),
    Task("Give some practical tips about {s}.", "tips", "train", allows=_LIST_OK),
    Task("What advice would you give a beginner about {s}?", "tips", "train", allows=_LIST_OK),
    Task("Write a short poem about {s}.", "poem", "train"),
    Task("Compose a few lines of verse about {s}.", "poem", "train"),
    Task("Why does {s} matter? Answer briefly.", "reason", "train"),
    Task("What is special about {s}?", "reason", "train"),
    Task("Write a short note to a friend about {s}.", "note", "train"),
    Task("Write a quick message to a colleague about {s}.", "note", "train"),
    Task("Put together a short article for a local newsletter about {s}.", "blog", "heldout"),
    Task("How would you explain {s} to someone from another century?", "explanation", "heldout"),
    Task("Invent a bedtime story featuring {s}.", "story", "heldout"),
    Task("Write a limerick about {s}.", "poem", "heldout"),
    Task("List a few dos and don'ts about {s}.", "tips", "heldout", allows=_LIST_OK),
    Task("Write a diary entry about a day that involved {s}.", "diary", "heldout"),
    Task("Write a short speech for a school assembly about {s}.", "speech", "heldout"),
    Task("Write a short advertisement that celebrates {s}.", "advertisement", "heldout"),
    Task("Write a brief review of an imaginary book about {s}.", "review", "heldout"),
)

# Every template, both sides.
TASKS: tuple[str, ...] = tuple(t.template for t in TASK_SET)


def tasks(split: Split) -> tuple[Task, ...]:
    return tuple(t for t in TASK_SET if t.split == split)


@functools.cache
def _tasks_by_template() -> dict[str, Task]:
    return {t.template: t for t in TASK_SET}


def task_of(template: str) -> Task | None:
    """The Task of a template (None for a template not in TASK_SET, e.g. a test's own)."""
    return _tasks_by_template().get(template)


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

# Words a response must include (keywords:existence, keywords:frequency "at least"): plain words
# that fit most tasks.
KEYWORDS: tuple[str, ...] = (
    "bright", "quiet", "simple", "morning", "journey", "garden", "window", "gentle", "history",
    "future", "river", "smile", "careful", "golden", "paper", "friend", "energy", "balance",
)  # fmt: skip

# Words a response must avoid (keywords:forbidden_words): words the model uses often unasked.
FORBIDDEN: tuple[str, ...] = (
    "very", "also", "many", "important", "like", "really", "great", "just", "can", "your",
)  # fmt: skip

# Words to ration (keywords:frequency "less than"): used often unasked, and no common word holds
# them (the checker counts substrings: "very" would count inside "every").
RATIONED: tuple[str, ...] = ("really", "important", "also", "great", "things")

END_PHRASES: tuple[str, ...] = (
    "Any other questions?",  # IFEval's own options
    "Is there anything else I can help with?",
    "That is all.",
)

# The IFEval instruction ids training prompts use (all in lm-eval's INSTRUCTION_DICT).
DEFAULT_INSTRUCTIONS: tuple[str, ...] = (
    "change_case:english_lowercase",
    "change_case:english_capital",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "length_constraints:number_words",
    "length_constraints:number_paragraphs",
    "detectable_format:title",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_content:postscript",
)

# Families only held-out prompts use: does following instructions carry over to a kind of
# instruction the policy was never rewarded for?
HELDOUT_ONLY_INSTRUCTIONS: tuple[str, ...] = (
    "detectable_content:number_placeholders",
    "detectable_format:multiple_sections",
)

# Pairs IFEval's INSTRUCTION_CONFLICTS allows but no answer can meet together: the section
# checker matches its splitter ("SECTION") case-sensitively, so no all-lowercase answer has
# sections, and the splitter we draw is upper case for the all-capitals one.
_EXTRA_CONFLICTS: frozenset[frozenset[str]] = frozenset({
    frozenset({"detectable_format:multiple_sections", "change_case:english_lowercase"}),
    frozenset({"detectable_format:multiple_sections", "change_case:english_capital"}),
})  # fmt: skip

# --- phrasings -----------------------------------------------------------------------------------
# Each instruction's own wordings, as str.format templates over the fields `_fields` derives from
# the checker's kwargs: (train phrasings, held-out phrasings). IFEval's description is one more
# held-out phrasing (key "<iid>/ifeval"). A phrasing must say everything its checker tests
# (e.g. the *** divider between paragraphs), or the prompt would ask for less than is checked.
PHRASINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "change_case:english_lowercase": (
        (
            "Write everything in lowercase letters; do not use a single capital letter.",
            "Use only lowercase letters in your reply, with no capitals anywhere.",
            "Your whole answer must be in English and in lowercase, without any uppercase letters.",
            "No capital letters at all, please: keep every letter of the answer lowercase.",
        ),
        (
            "Type the entire reply in small letters only (English, no capitals).",
            "Do not capitalise anything, not even the first word of a sentence.",
        ),
    ),
    "change_case:english_capital": (
        (
            "Write your entire answer in English using capital letters only.",
            "Use only uppercase letters in your reply, with no lowercase letters anywhere.",
            "Your whole answer must be in English and in ALL CAPS.",
            "Every letter of the answer should be a capital letter.",
        ),
        (
            "Type the entire reply in block capitals (English, nothing in small letters).",
            "Shout the whole answer: upper-case letters from start to finish.",
        ),
    ),
    "punctuation:no_comma": (
        (
            "Do not use any commas in your answer.",
            "Avoid commas entirely.",
            "Your reply must not contain a single comma.",
            "Write without commas: not one should appear.",
        ),
        (
            "Leave out every comma (use other punctuation instead).",
            "Commas are not allowed anywhere in the text.",
        ),
    ),
    "startend:end_checker": (
        (
            'End your answer with this exact phrase: "{phrase}"',
            'Finish with these words, and nothing after them: "{phrase}"',
            'The last words of your reply must be "{phrase}"',
            'Close your response with the phrase "{phrase}" and write nothing after it.',
        ),
        (
            'Make "{phrase}" the very final sentence, with nothing following it.',
            'Sign off by writing "{phrase}" as the closing line.',
        ),
    ),
    "startend:quotation": (
        (
            "Put your entire answer inside double quotation marks.",
            "Enclose the whole reply in double quotes, from the first character to the last.",
            'Start and end your answer with a double quotation mark (").',
            'Your response should be one quoted text: begin it with " and end it with ".',
        ),
        (
            "Present the full answer as a quotation, surrounded by double quote marks.",
            "The first and the last character of your reply must both be a double quote.",
        ),
    ),
    "keywords:existence": (
        (
            "Include {words} in your answer.",
            "Make sure to use {words}.",
            "Your reply has to mention {words}.",
            "Somewhere in the text, use {words}.",
        ),
        (
            "Work {words} into the answer.",
            "Do not forget to put {words} in what you write.",
        ),
    ),
    "keywords:forbidden_words": (
        (
            "Do not use the words {either}.",
            "Avoid the words {both} completely.",
            "Your answer must not contain {either}.",
            "Never write {either} in your reply.",
        ),
        (
            "Steer clear of {both}: neither may appear.",
            "The words {both} are off limits.",
        ),
    ),
    "keywords:frequency": (
        (
            "Use the word {word} {times_a}.",
            "The word {word} should appear {times_b} in your answer.",
            "Mention {word} {times_a} in your reply.",
            "Make sure {word} occurs {times_b}.",
        ),
        (
            "Count your uses of {word}: it must come up {times_a}.",
            "Write {word} {times_b}, wherever it fits.",
        ),
    ),
    "length_constraints:number_words": (
        (
            "Answer in {bound_a}.",
            "The whole reply should be {bound_b} long.",
            "Your response must have {bound_c}.",
            "Use {bound_a} in total.",
        ),
        (
            "Length requirement: {bound_c}.",
            "Write {bound_b}, counting every word.",
        ),
    ),
    "length_constraints:number_paragraphs": (
        (
            "Write exactly {n} paragraphs, separating them with a line containing only ***.",
            "Split your answer into {n_word} paragraphs and put the markdown divider *** between"
            " each pair.",
            "Your reply must have {n} paragraphs; mark the break between paragraphs with ***.",
            "Use {n_word} paragraphs, divided from each other by ***.",
        ),
        (
            "Organise the text as {n_word} paragraphs, each separated from the next by three"
            " asterisks (***).",
            "Give {n} blocks of text, with *** on its own between consecutive blocks.",
        ),
    ),
    "detectable_format:title": (
        (
            "Give your answer a title wrapped in double angle brackets, for example"
            " <<a quiet morning>>.",
            "Begin with a title inside double angular brackets, like <<my title>>.",
            "Add a title to your reply and put it between << and >>.",
            "Your answer needs a title, written as <<title>>.",
        ),
        (
            "Head the text with a name for it enclosed in double chevrons, as in <<Early Light>>.",
            "Include a heading of the form <<Heading Text>> somewhere in your reply.",
        ),
    ),
    "detectable_format:number_bullet_lists": (
        (
            "Format your answer as exactly {n} markdown bullet points, each line starting with *.",
            "Give {n_word} bullet points, no more and no fewer, using * at the start of each.",
            'Your reply must contain exactly {n} bullets, each a line like "* a point".',
            "List exactly {n} points as markdown bullets (a line that starts with * or -).",
        ),
        (
            "Use {n_word} bulleted lines (begin each with an asterisk) and no other bullets.",
            "Present precisely {n} items as a markdown list using *, and add no extra list items.",
        ),
    ),
    "detectable_format:number_highlighted_sections": (
        (
            "Emphasise at least {n} phrase{pl} by wrapping each in single asterisks, like *this*.",
            "Mark {n_word} or more parts of the text as highlighted, using *asterisks around"
            " them*.",
            "Your reply should contain at least {n} highlighted section{pl} in markdown"
            " (*highlighted*).",
            "Put asterisks around at least {n} key phrase{pl}, for example *key phrase*.",
        ),
        (
            "Make at least {n_word} passage{pl} stand out by enclosing each in *single stars*.",
            "Use markdown emphasis (*text*) on no fewer than {n} spot{pl}.",
        ),
    ),
    "detectable_content:postscript": (
        (
            "Add a postscript at the end, beginning with {marker}",
            "Include a postscript that starts with {marker} after the main text.",
            "Close with an extra note introduced by {marker}",
            "Your reply must end with a postscript marked {marker}",
        ),
        (
            "After you sign off, add an afterthought that opens with {marker}",
            "Tack a {marker} line onto the end of the reply.",
        ),
    ),
    "detectable_content:number_placeholders": (
        (
            "Leave at least {n} placeholder{pl} in square brackets, such as [name].",
            "Include {n_word} or more blanks written in square brackets, like [date].",
            "Your reply should contain at least {n} bracketed placeholder{pl}, e.g. [address].",
            "Use at least {n} fill-in field{pl} in square brackets, such as [your name].",
        ),
        (
            "Put at least {n_word} template slot{pl} in square brackets (for example [city]) for"
            " the reader to fill in.",
            "Keep {n_word} or more parts generic, marked like [place] or [time].",
        ),
    ),
    "detectable_format:multiple_sections": (
        (
            "Divide your answer into {n} sections, starting each with {spliter} and its number"
            " ({spliter} 1, {spliter} 2, ...).",
            "Organise the reply as {n_word} sections headed {spliter} 1, {spliter} 2 and so on.",
            'Your answer must have {n} parts, each beginning with a line like "{spliter} 1".',
            "Split the text into {n} numbered sections marked {spliter} X.",
        ),
        (
            "Break the response into {n_word} labelled chunks: {spliter} 1, then {spliter} 2,"
            " and so on.",
            "Use {n} headed sections, the heading being the word {spliter} followed by the"
            " section number.",
        ),
    ),
}

IFEVAL_PHRASING = "ifeval"
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _num_word(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def _quoted_and(words: Sequence[str], conj: str) -> str:
    q = [f'"{w}"' for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + f" {conj} " + q[-1]


def _fields(iid: str, kwargs: dict[str, Any]) -> dict[str, str]:
    """The words a phrasing needs, derived from the checker's kwargs (what the checker tests)."""
    f: dict[str, str] = {}
    if iid == "keywords:existence":
        kw = list(kwargs["keywords"])
        f["words"] = ("the word " if len(kw) == 1 else "the words ") + _quoted_and(kw, "and")
    elif iid == "keywords:forbidden_words":
        fw = list(kwargs["forbidden_words"])
        f["either"] = _quoted_and(fw, "or")
        f["both"] = _quoted_and(fw, "and")
    elif iid == "keywords:frequency":
        n, rel = int(kwargs["frequency"]), str(kwargs["relation"])
        f["word"] = f'"{kwargs["keyword"]}"'
        if rel == "at least":
            f["times_a"], f["times_b"] = f"at least {n} times", f"{n} or more times"
        else:  # "less than": the count must be below n
            most = n - 1
            f["times_a"] = f"fewer than {n} times"
            f["times_b"] = "at most once" if most == 1 else f"at most {most} times"
            if most == 0:
                f["times_b"] = "not even once"
    elif iid == "length_constraints:number_words":
        n, rel = int(kwargs["num_words"]), str(kwargs["relation"])
        if rel == "less than":
            f["bound_a"], f["bound_b"] = f"fewer than {n} words", f"under {n} words"
            f["bound_c"] = f"less than {n} words"
        else:
            f["bound_a"], f["bound_b"] = f"at least {n} words", f"no fewer than {n} words"
            f["bound_c"] = f"{n} words or more"
    elif iid == "detectable_content:postscript":
        f["marker"] = str(kwargs["postscript_marker"])
    elif iid == "startend:end_checker":
        f["phrase"] = str(kwargs["end_phrase"])
    elif iid == "detectable_format:multiple_sections":
        f["spliter"] = str(kwargs["section_spliter"])
    count_key = {
        "length_constraints:number_paragraphs": "num_paragraphs",
        "detectable_format:number_bullet_lists": "num_bullets",
        "detectable_format:number_highlighted_sections": "num_highlights",
        "detectable_content:number_placeholders": "num_placeholders",
        "detectable_format:multiple_sections": "num_sections",
    }.get(iid)
    if count_key is not None:
        n = int(kwargs[count_key])
        f["n"], f["n_word"], f["pl"] = str(n), _num_word(n), "" if n == 1 else "s"
    return f


def phrasings(iid: str, split: Split) -> tuple[str, ...]:
    """Keys of the phrasings of `iid` on one side ("<iid>/<split>/<i>", "<iid>/ifeval")."""
    train, held = PHRASINGS[iid]
    if split == "train":
        return tuple(f"{iid}/train/{i}" for i in range(len(train)))
    return (*(f"{iid}/heldout/{i}" for i in range(len(held))), f"{iid}/{IFEVAL_PHRASING}")


def phrasing_split(key: str) -> Split:
    """Which side a phrasing key belongs to (IFEval's own text is held out)."""
    return "train" if key.split("/")[1] == "train" else "heldout"


def _phrasing_template(key: str) -> tuple[str, str | None]:
    """(instruction id, template; None = IFEval's build_description) of a phrasing key."""
    iid, side, *rest = key.split("/")
    if side == IFEVAL_PHRASING and not rest:
        return iid, None
    try:
        train, held = PHRASINGS[iid]
        return iid, (train if side == "train" else held)[int(rest[0])]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"unknown phrasing key {key!r}") from e


def describe(iid: str, kwargs: dict[str, Any], phrasing: str | None = None) -> str:
    """The instruction's text: phrasing `phrasing` (a key of `phrasings`), or IFEval's own."""
    if phrasing is None:
        template = None
    else:
        piid, template = _phrasing_template(phrasing)
        if piid != iid:
            raise ValueError(f"phrasing {phrasing!r} is not one of {iid}'s")
    if template is None:
        checker = _ifeval().registry.INSTRUCTION_DICT[iid](iid)
        return str(checker.build_description(**kwargs))
    return template.format(**_fields(iid, kwargs))


@dataclass(frozen=True)
class ConstraintConfig:
    """How prompts are drawn. Defaults are ours (the paper's prompts came from API users)."""

    # Which IFEval checkers to draw from (train and held-out).
    instructions: tuple[str, ...] = DEFAULT_INSTRUCTIONS
    # Checkers only held-out prompts draw from, besides `instructions`.
    heldout_only_instructions: tuple[str, ...] = HELDOUT_ONLY_INSTRUCTIONS
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
    # keywords:frequency: "at least N" of a KEYWORDS word, "less than N" of a RATIONED one.
    frequency_at_least: tuple[int, ...] = (2, 3)
    frequency_less_than: tuple[int, ...] = (2, 3)
    # length_constraints:number_paragraphs: exact counts (short answers, so few).
    paragraph_counts: tuple[int, ...] = (2, 3)
    # detectable_format:number_highlighted_sections: minimum counts.
    highlight_counts: tuple[int, ...] = (1, 2, 3)
    # detectable_content:number_placeholders, detectable_format:multiple_sections: minimums.
    placeholder_counts: tuple[int, ...] = (1, 2)
    section_counts: tuple[int, ...] = (2, 3)

    def __post_init__(self) -> None:
        ifeval = _ifeval()
        every = (*self.instructions, *self.heldout_only_instructions)
        unknown = [i for i in every if i not in ifeval.registry.INSTRUCTION_DICT]
        if unknown:
            raise ValueError(f"unknown IFEval instruction ids: {unknown}")
        if "length_constraints:number_sentences" in every:
            raise ValueError("length_constraints:number_sentences needs nltk punkt (not here)")
        unworded = [i for i in every if i not in PHRASINGS]
        if unworded:
            raise ValueError(f"no phrasings (and no argument draw) for: {unworded}")
        if not self.instructions:
            raise ValueError("instructions must not be empty")
        if set(self.instructions) & set(self.heldout_only_instructions):
            raise ValueError("heldout_only_instructions must not also be in instructions")
        if len(self.n_constraints_weights) != 3 or min(self.n_constraints_weights) < 0:
            raise ValueError("n_constraints_weights: three non-negative weights for 1, 2, 3")
        if sum(self.n_constraints_weights) <= 0:
            raise ValueError("n_constraints_weights must not all be 0")
        if not 0 < self.heldout_percent < 100:
            raise ValueError("heldout_percent must be in (0, 100)")

    def instructions_for(self, split: Split) -> tuple[str, ...]:
        """The checkers prompts of `split` draw from."""
        if split == "train":
            return self.instructions
        return (*self.instructions, *self.heldout_only_instructions)


@dataclass(frozen=True)
class ConstraintPrompt:
    """One prompt with its verifiable instructions (IFEval's record layout, plus how it was
    built: the task template and each instruction's phrasing key, "" and () when unknown)."""

    id: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    subject: str = ""
    split: str = ""
    task: str = ""
    phrasings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "instruction_ids": list(self.instruction_ids),
            "kwargs": [dict(k) for k in self.kwargs],
            "subject": self.subject,
            "split": self.split,
            "task": self.task,
            "phrasings": list(self.phrasings),
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
                task=str(row.get("task", "")),
                phrasings=tuple(str(k) for k in row.get("phrasings", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a constraint prompt row: {e!r}") from e
        if len(p.instruction_ids) != len(p.kwargs):
            raise ValueError(f"{p.id}: {len(p.instruction_ids)} ids but {len(p.kwargs)} kwargs")
        if p.phrasings and len(p.phrasings) != len(p.instruction_ids):
            n, m = len(p.instruction_ids), len(p.phrasings)
            raise ValueError(f"{p.id}: {n} ids but {m} phrasings")
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
    langdetect (used by the case checkers) is random unless seeded: seed it so a score is a
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
    return (
        a == b
        or b in c.get(a, set())
        or a in c.get(b, set())
        or frozenset({a, b}) in _EXTRA_CONFLICTS
    )


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


def prompt_id(prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any]]) -> str:
    blob = json.dumps([prompt, list(instruction_ids), list(kwargs)], sort_keys=True)
    return "cp-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


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
            if not any(_conflicts(iid, j) for j in ids):
                ids.append(iid)
        kwargs = [_draw_kwargs(rng, i, cfg) for i in ids]
        keys = [rng.choice(phrasings(i, split)) for i in ids]
        task, subject = rng.choice(templates), rng.choice(pool)
        p = make_prompt(task, subject, ids, kwargs, cfg, phrasings=keys)
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


def per_instruction_accuracy(
    prompts: Sequence[ConstraintPrompt], answers: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per instruction id: how many prompts asked for it ("n"), how many answers met it ("met"),
    and the share ("accuracy"); ids in sorted order. IFEval's strict checkers."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    met: dict[str, list[bool]] = {}
    for p, a in zip(prompts, answers, strict=True):
        for iid, ok in zip(p.instruction_ids, follows(p, a), strict=True):
            met.setdefault(iid, []).append(ok)
    return {
        k: {"n": len(v), "met": sum(v), "accuracy": sum(v) / len(v)} for k, v in sorted(met.items())
    }


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
