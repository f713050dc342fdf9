"""How prompts are drawn: which checkers, how many per prompt, the held-out share, and the
argument choices."""

from __future__ import annotations

from dataclasses import dataclass

from instructloop.training.data.constraints.checkers import load_ifeval
from instructloop.training.data.constraints.families import (
    DEFAULT_INSTRUCTIONS,
    HELDOUT_ONLY_INSTRUCTIONS,
)
from instructloop.training.data.constraints.templates import Split
from instructloop.training.data.constraints.wording import PHRASINGS


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
        ifeval = load_ifeval()
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
