"""Which IFEval checkers prompts use, the words their arguments are drawn from, and which pairs
no answer can meet together."""

from __future__ import annotations

from instructloop.training.data.constraints.checkers import load_ifeval

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
EXTRA_CONFLICTS: frozenset[frozenset[str]] = frozenset({
    frozenset({"detectable_format:multiple_sections", "change_case:english_lowercase"}),
    frozenset({"detectable_format:multiple_sections", "change_case:english_capital"}),
})  # fmt: skip


def conflicts(a: str, b: str) -> bool:
    """Whether one prompt must not ask for both `a` and `b` (IFEval's conflicts, and ours)."""
    c = load_ifeval().registry.INSTRUCTION_CONFLICTS
    return (
        a == b
        or b in c.get(a, set())
        or a in c.get(b, set())
        or frozenset({a, b}) in EXTRA_CONFLICTS
    )
