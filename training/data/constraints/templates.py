"""What a prompt is about: task templates, with the side of the split each belongs to, and the
subjects they are written about (the split groups)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

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
