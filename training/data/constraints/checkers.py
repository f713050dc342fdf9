"""IFEval's checkers, from lm-eval, unchanged: importing them, and checking a response."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from types import ModuleType

from instructloop.training.data.constraints.records import ConstraintPrompt


@dataclass(frozen=True)
class IFEval:
    """lm-eval's IFEval modules: the checker registry and the strict test."""

    registry: ModuleType
    utils: ModuleType


@functools.cache
def load_ifeval() -> IFEval:
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
    return IFEval(registry=instructions_registry, utils=utils)


def follows(prompt: ConstraintPrompt, response: str) -> list[bool]:
    """Per instruction: does `response` follow it? IFEval's strict test, unchanged."""
    u = load_ifeval().utils
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
