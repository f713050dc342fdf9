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

Modules, bottom up: `records` (the prompt record and its JSONL file), `checkers` (lm-eval's
checkers), `templates` (tasks and subjects), `families` (which checkers, their argument words,
conflicts), `wording` (phrasings), `config`, `heldout` (the subject split), `generate` (drawing
prompts), `scoring` (accuracy over many prompts).
"""

from instructloop.training.data.constraints.checkers import follows, score
from instructloop.training.data.constraints.config import ConstraintConfig
from instructloop.training.data.constraints.families import (
    DEFAULT_INSTRUCTIONS,
    END_PHRASES,
    FORBIDDEN,
    HELDOUT_ONLY_INSTRUCTIONS,
    KEYWORDS,
    RATIONED,
)
from instructloop.training.data.constraints.generate import generate_prompts, make_prompt
from instructloop.training.data.constraints.heldout import split_of, subjects
from instructloop.training.data.constraints.records import (
    ConstraintPrompt,
    iter_prompts,
    load_prompts,
    prompt_id,
    save_prompts,
)
from instructloop.training.data.constraints.scoring import (
    IFEvalAccuracy,
    PairedGain,
    accuracy,
    paired_gain,
    per_instruction_accuracy,
)
from instructloop.training.data.constraints.templates import (
    SUBJECTS,
    TASK_SET,
    TASKS,
    Split,
    Task,
    task_of,
    tasks,
)
from instructloop.training.data.constraints.wording import (
    IFEVAL_PHRASING,
    PHRASINGS,
    describe,
    phrasing_split,
    phrasings,
)

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "END_PHRASES",
    "FORBIDDEN",
    "HELDOUT_ONLY_INSTRUCTIONS",
    "IFEVAL_PHRASING",
    "KEYWORDS",
    "PHRASINGS",
    "RATIONED",
    "SUBJECTS",
    "TASKS",
    "TASK_SET",
    "ConstraintConfig",
    "ConstraintPrompt",
    "IFEvalAccuracy",
    "PairedGain",
    "Split",
    "Task",
    "accuracy",
    "describe",
    "follows",
    "generate_prompts",
    "iter_prompts",
    "load_prompts",
    "make_prompt",
    "paired_gain",
    "per_instruction_accuracy",
    "phrasing_split",
    "phrasings",
    "prompt_id",
    "save_prompts",
    "score",
    "split_of",
    "subjects",
    "task_of",
    "tasks",
]
