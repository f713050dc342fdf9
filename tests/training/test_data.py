"""The data generators: constraint prompts, IFEval checkers, the simulated labeller, export rows.

No engine needed: these are pure functions over text. The checkers are lm-eval's; the tests pin
that the arguments we give them mean what we think (pass and fail on hand-written answers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from instructloop.training.data.constraints import (
    DEFAULT_INSTRUCTIONS,
    HELDOUT_ONLY_INSTRUCTIONS,
    PHRASINGS,
    SUBJECTS,
    TASK_SET,
    ConstraintConfig,
    ConstraintPrompt,
    IFEvalAccuracy,
    accuracy,
    describe,
    follows,
    generate_prompts,
    load_prompts,
    make_prompt,
    paired_gain,
    per_instruction_accuracy,
    phrasing_split,
    phrasings,
    save_prompts,
    score,
    split_of,
    subjects,
    tasks,
)
from instructloop.training.data.demonstrations import pick_demonstration
from instructloop.training.data.generation import Completion
from instructloop.training.data.simulated_labeler import (
    preference_rows,
    rank,
    ranking_row,
    write_export,
)

# --- the generator -------------------------------------------------------------------------------


def test_generator_is_deterministic() -> None:
    a = generate_prompts(120, "train", seed=3)
    b = generate_prompts(120, "train", seed=3)
    c = generate_prompts(120, "train", seed=4)
    assert [p.to_json() for p in a] == [p.to_json() for p in b]
    assert [p.id for p in a] != [p.id for p in c]
    assert len({p.id for p in a}) == 120  # distinct


def test_split_is_disjoint_by_subject_and_stable() -> None:
    train = generate_prompts(300, "train")
    held = generate_prompts(100, "heldout")
    assert {p.split for p in train} == {"train"} and {p.split for p in held} == {"heldout"}
    assert not {p.subject for p in train} & {p.subject for p in held}
    assert not {p.id for p in train} & {p.id for p in held}
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    # Every subject is on exactly one side, roughly heldout_percent of them held out.
    tr, he = set(subjects("train")), set(subjects("heldout"))
    assert tr | he == set(SUBJECTS) and not tr & he
    assert 0.1 <= len(he) / len(SUBJECTS) <= 0.35
    # The split is a function of the subject (and salt), not of the draw.
    assert all(split_of(p.subject) == "heldout" for p in held)
    other = ConstraintConfig(split_salt="another")
    assert set(subjects("heldout", other)) != he


def test_prompts_use_1_to_3_compatible_constraints() -> None:
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    ps = generate_prompts(300, "train", seed=1)
    sizes = {len(p.instruction_ids) for p in ps}
    assert sizes == {1, 2, 3}
    for p in ps:
        assert set(p.instruction_ids) <= set(DEFAULT_INSTRUCTIONS)
        for i in p.instruction_ids:
            others = set(p.instruction_ids) - {i}
            assert not others & set(INSTRUCTION_CONFLICTS[i]), p.instruction_ids
    used = {i for p in ps for i in p.instruction_ids}
    assert used == set(DEFAULT_INSTRUCTIONS)


def test_heldout_shares_no_template_subject_or_phrasing_with_train() -> None:
    """Held-out prompts are new in every part a policy could memorise: subject, task wording,
    constraint wording, and (for some) the kind of constraint. Checked on the text itself, not
    only on the metadata the generator records."""
    train = generate_prompts(400, "train", seed=0)
    held = generate_prompts(300, "heldout", seed=0)

    train_templates = {p.task for p in train}
    assert train_templates <= {t.template for t in tasks("train")}
    assert {p.task for p in held} <= {t.template for t in tasks("heldout")}
    assert not train_templates & {p.task for p in held}
    # Whole task families training never sees.
    assert {t.family for t in tasks("heldout")} - {t.family for t in tasks("train")}
    assert {task.family for task in TASK_SET if task.template in {p.task for p in held}} - {
        task.family for task in TASK_SET if task.template in train_templates
    }

    train_subjects = {p.subject for p in train}
    held_subjects = {p.subject for p in held}
    assert not train_subjects & held_subjects

    def mentions(text: str, subject: str) -> bool:
        return re.search(rf"\b{re.escape(subject)}\b", text, flags=re.IGNORECASE) is not None

    train_phrasings = {k for p in train for k in p.phrasings}
    assert not train_phrasings & {k for p in held for k in p.phrasings}
    for p in held:
        assert p.prompt.startswith(p.task.format(s=p.subject))
        # No training template, worded with this prompt's subject, appears in it.
        assert not any(t.format(s=p.subject) in p.prompt for t in train_templates), p.prompt
        assert not any(mentions(p.prompt, s) for s in train_subjects), p.prompt
        for iid, kw, key in zip(p.instruction_ids, p.kwargs, p.phrasings, strict=True):
            assert phrasing_split(key) == "heldout"
            # No training phrasing of this instruction, with these arguments, appears in it.
            for tk in phrasings(iid, "train"):
                assert describe(iid, kw, tk) not in p.prompt, (tk, p.prompt)
    for p in train:
        assert not any(mentions(p.prompt, s) for s in held_subjects), p.prompt
        assert {phrasing_split(k) for k in p.phrasings} == {"train"}

    # Families only held out, while every family training has is measured held out too.
    held_ids = {i for p in held for i in p.instruction_ids}
    train_ids = {i for p in train for i in p.instruction_ids}
    assert (
        set(HELDOUT_ONLY_INSTRUCTIONS) <= held_ids
        and not set(HELDOUT_ONLY_INSTRUCTIONS) & train_ids
    )
    assert train_ids <= held_ids
    only = sum(any(i in HELDOUT_ONLY_INSTRUCTIONS for i in p.instruction_ids) for p in held)
    assert 0 < only / len(held) < 0.35  # most of the held-out set measures trained families


def test_prompts_vary_their_wording() -> None:
    ps = generate_prompts(300, "train", seed=2)
    assert len({p.task for p in ps}) == len(tasks("train"))
    for iid in DEFAULT_INSTRUCTIONS:
        used = {
            k for p in ps for i, k in zip(p.instruction_ids, p.phrasings, strict=True) if i == iid
        }
        assert len(used) >= 3, iid
    # Both sides of the two-sided families.
    ids = [i for p in ps for i in p.instruction_ids]
    assert "change_case:english_capital" in ids and "change_case:english_lowercase" in ids
    relations = {
        (i, k["relation"])
        for p in ps
        for i, k in zip(p.instruction_ids, p.kwargs, strict=True)
        if "relation" in k
    }
    assert relations == {(i, r) for i in ("keywords:frequency", "length_constraints:number_words")
                         for r in ("less than", "at least")}  # fmt: skip


def test_prompt_ids_are_functions_of_the_content() -> None:
    for p in generate_prompts(50, "heldout", seed=5):
        again = make_prompt(p.task, p.subject, p.instruction_ids, p.kwargs, phrasings=p.phrasings)
        assert again == p
        assert ConstraintPrompt.from_json(json.loads(json.dumps(p.to_json()))) == p
    # A row written before prompts recorded their task and phrasings still loads.
    old = {k: v for k, v in p.to_json().items() if k not in ("task", "phrasings")}
    assert ConstraintPrompt.from_json(old).phrasings == ()


def test_per_instruction_accuracy_by_hand() -> None:
    p1 = make_prompt("Describe {s}.", "snow",
                     ["punctuation:no_comma", "detectable_format:title"], [{}, {}])  # fmt: skip
    p2 = make_prompt("Describe {s}.", "tea", ["punctuation:no_comma"], [{}])
    got = per_instruction_accuracy([p1, p2], ["<<snow>>\nIt is white, cold.", "Tea is hot."])
    assert got == {
        "detectable_format:title": {"n": 1, "met": 1, "accuracy": 1.0},
        "punctuation:no_comma": {"n": 2, "met": 1, "accuracy": 0.5},
    }
    with pytest.raises(ValueError, match="answers"):
        per_instruction_accuracy([p1], [])


def test_bad_config_and_args_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        ConstraintConfig(instructions=("no:such_checker",))
    with pytest.raises(ValueError, match="punkt"):
        ConstraintConfig(instructions=("length_constraints:number_sentences",))
    with pytest.raises(ValueError, match="split"):
        generate_prompts(3, "test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="responses"):
        accuracy(generate_prompts(2, "train"), ["only one"])
    with pytest.raises(ValueError, match="phrasings"):
        ConstraintConfig(instructions=("language:response_language",))
    with pytest.raises(ValueError, match="also be in"):
        ConstraintConfig(heldout_only_instructions=("punctuation:no_comma",))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    ps = generate_prompts(20, "heldout")
    path = save_prompts(tmp_path / "p.jsonl", ps)
    assert load_prompts(path) == ps
    path.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1"):
        load_prompts(path)


# --- each chosen checker, on hand-written answers -------------------------------------------------

LONG = " ".join(["word"] * 45)

CASES: list[tuple[str, dict, str, str]] = [
    # (instruction id, kwargs, an answer that follows it, one that does not)
    ("change_case:english_lowercase", {},
     "the moon is bright tonight and the sky is clear over the quiet town.",
     "The Moon is bright tonight and the sky is clear over the quiet town."),
    ("punctuation:no_comma", {},
     "Bees make honey and they live in hives.",
     "Bees make honey, and they live in hives."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Tea is made from leaves. Any other questions?",
     "Any other questions? Tea is made from leaves."),
    ("keywords:existence", {"keywords": ["golden", "river"]},
     "A golden light fell on the River.",
     "A golden light fell on the lake."),
    ("keywords:forbidden_words", {"forbidden_words": ["also", "very"]},
     "Trains are fast and quiet. Everyone enjoys them.",
     "Trains are very fast and quiet."),
    ("length_constraints:number_words", {"num_words": 20, "relation": "less than"},
     "Snow is cold and white.",
     LONG),
    ("length_constraints:number_words", {"num_words": 40, "relation": "at least"},
     LONG,
     "Snow is cold and white."),
    ("detectable_format:title", {},
     "<<ode to coffee>>\nCoffee wakes me up.",
     "Ode to coffee\nCoffee wakes me up."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "Tips:\n* Plan your day.\n* Rest well.\n- Drink water.",
     "Tips:\n* Plan your day.\n* Rest well."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Happy birthday!\n\nP.S. See you soon.",
     "Happy birthday! See you soon."),
    ("startend:quotation", {},
     '"Forests are full of life."',
     "Forests are full of life."),
    ("change_case:english_capital", {},
     "THE MOON IS BRIGHT TONIGHT AND THE SKY IS CLEAR OVER THE QUIET TOWN.",
     "The moon is bright tonight and the sky is clear over the quiet town."),
    ("keywords:frequency", {"keyword": "river", "frequency": 3, "relation": "at least"},
     "The river bends. The river shines. The river sleeps.",
     "The river bends and shines."),
    ("keywords:frequency", {"keyword": "really", "frequency": 2, "relation": "less than"},
     "It is really good.",
     "It is really good and really warm."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "Tea is warm.\n\n***\n\nIt calms the mind.",
     "Tea is warm.\n\nIt calms the mind."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "Tea is *warm* and *calming*.",
     "Tea is *warm* and calming."),
]  # fmt: skip

# Checkers only held-out prompts use.
HELDOUT_CASES: list[tuple[str, dict, str, str]] = [
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], meet me at [place] for tea.",
     "Dear friend, meet me at the cafe for [drink]."),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nTea is warm.\nSECTION 2\nIt calms the mind.",
     "Tea is warm.\nSection 1 is about calm."),
]  # fmt: skip


ALL_CASES = CASES + HELDOUT_CASES


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_each_checker_passes_and_fails_by_hand(iid: str, kwargs: dict, good: str, bad: str) -> None:
    p = make_prompt("Write about {s}.", "tea", [iid], [kwargs])
    assert follows(p, good) == [True]
    assert follows(p, bad) == [False]
    assert score(p, good) == (1, 1) and score(p, bad) == (0, 1)


def test_every_default_checker_is_covered_by_a_case() -> None:
    assert {c[0] for c in CASES} == set(DEFAULT_INSTRUCTIONS)
    assert {c[0] for c in HELDOUT_CASES} == set(HELDOUT_ONLY_INSTRUCTIONS)


def _says_its_arguments(text: str, kwargs: dict) -> bool:
    """Does an instruction's text name every argument its checker tests?"""
    numbers = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

    def spelled(n: int) -> set[str]:
        return {str(n), numbers[n]} if n < len(numbers) else {str(n)}

    relation_words = {
        "less than": ("fewer than", "less than", "under", "at most", "not even"),
        "at least": ("at least", "or more", "no fewer than"),
    }
    for key, v in kwargs.items():
        if key == "relation":
            if not any(w in text for w in relation_words[v]):
                return False
        elif isinstance(v, int):
            said = spelled(v)
            if kwargs.get("relation") == "less than":
                said |= spelled(v - 1) | {"once"}  # "fewer than 2 times" may read "at most once"
            if not any(re.search(rf"\b{w}\b", text) for w in said):
                return False
        elif isinstance(v, list):
            if not all(w in text for w in v):
                return False
        elif v not in text:
            return False
    return True


PHRASED_CASES = [
    (iid, kwargs, good, bad, key)
    for iid, kwargs, good, bad in ALL_CASES
    for split in ("train", "heldout")
    for key in phrasings(iid, split)
]


@pytest.mark.parametrize(
    ("iid", "kwargs", "good", "bad", "key"), PHRASED_CASES, ids=[c[4] for c in PHRASED_CASES]
)
def test_every_phrasing_keeps_the_checker_and_says_its_arguments(
    iid: str, kwargs: dict, good: str, bad: str, key: str
) -> None:
    """A paraphrase changes the words, not the check: the same arguments reach lm-eval's checker
    (pass and fail as with IFEval's text), and the text names each of them."""
    p = make_prompt("Write about {s}.", "tea", [iid], [kwargs], phrasings=[key])
    assert p.prompt.startswith("Write about tea. ") and p.phrasings == (key,)
    assert follows(p, good) == [True]
    assert follows(p, bad) == [False]
    assert _says_its_arguments(describe(iid, kwargs, key), kwargs), describe(iid, kwargs, key)


def test_each_instruction_has_train_and_heldout_phrasings() -> None:
    for iid in (*DEFAULT_INSTRUCTIONS, *HELDOUT_ONLY_INSTRUCTIONS):
        train, held = phrasings(iid, "train"), phrasings(iid, "heldout")
        assert len(train) >= 3 and len(held) >= 2, iid
        assert {phrasing_split(k) for k in train} == {"train"}
        assert {phrasing_split(k) for k in held} == {"heldout"}
        texts = [t for side in PHRASINGS[iid] for t in side]
        assert len(set(texts)) == len(texts), iid
    with pytest.raises(ValueError, match="phrasing"):
        describe("punctuation:no_comma", {}, "detectable_format:title/train/0")
    with pytest.raises(ValueError, match="phrasing"):
        describe("punctuation:no_comma", {}, "punctuation:no_comma/train/99")


def test_descriptions_are_ifeval_text() -> None:
    p = make_prompt("Describe {s}.", "snow", ["punctuation:no_comma", "detectable_format:title"],
                    [{}, {}])  # fmt: skip
    assert p.prompt.startswith("Describe snow. ")
    assert "refrain from the use of any commas" in p.prompt
    assert "<<poem of joy>>" in p.prompt


def test_empty_response_follows_nothing() -> None:
    p = make_prompt("Describe {s}.", "snow", ["punctuation:no_comma"], [{}])
    assert score(p, "   ") == (0, 1)  # IFEval's strict test: an empty answer fails everything


def test_accuracy_prompt_and_instruction_level_by_hand() -> None:
    p1 = make_prompt("Describe {s}.", "snow",
                     ["punctuation:no_comma", "detectable_format:title"], [{}, {}])  # fmt: skip
    p2 = make_prompt("Describe {s}.", "tea", ["keywords:existence"], [{"keywords": ["green"]}])
    responses = ["<<snow>>\nIt is white and cold.", "Tea is brown, hot."]
    acc = accuracy([p1, p2], responses)
    # p1 meets 2/2, p2 meets 0/1: prompt level 1/2, instruction level 2/3.
    assert acc.prompt_level == pytest.approx(1 / 2)
    assert acc.instruction_level == pytest.approx(2 / 3)
    assert (acc.n_prompts, acc.n_instructions) == (2, 3)
    assert acc.per_instruction == {
        "detectable_format:title": 1.0,
        "keywords:existence": 0.0,
        "punctuation:no_comma": 1.0,
    }
    assert acc.per_prompt == (True, False)


def test_paired_gain_by_hand() -> None:
    p = make_prompt("Describe {s}.", "snow", ["punctuation:no_comma"], [{}])
    ok, bad = "Snow is white.", "Snow is white, cold."
    # Four prompts: before meets 1 and 2, after meets 2, 3 and 4 -> gained 2, lost 1.
    before = accuracy([p] * 4, [ok, ok, bad, bad])
    after = accuracy([p] * 4, [bad, ok, ok, ok])
    g = paired_gain(before, after)
    # d = (-1, 0, 1, 1): mean 1/4; sample variance ((5/4)^2 + (1/4)^2 + 2 (3/4)^2) / 3 = 11/12.
    assert (g.gained, g.lost, g.n_prompts) == (2, 1, 4)
    assert g.points == pytest.approx(25.0)
    assert g.standard_error_points == pytest.approx(100 * (11 / 12 / 4) ** 0.5)
    assert g.points == pytest.approx(100 * (after.prompt_level - before.prompt_level))
    with pytest.raises(ValueError, match="same prompts"):
        paired_gain(before, accuracy([p] * 3, [ok, ok, ok]))


# --- the simulated labeller ----------------------------------------------------------------------


def _three_constraint_prompt() -> ConstraintPrompt:
    return make_prompt(
        "Write a short poem about {s}.",
        "the moon",
        ["punctuation:no_comma", "detectable_format:title", "startend:end_checker"],
        [{}, {}, {"end_phrase": "That is all."}],
    )


def test_labeller_ranks_by_constraints_met_with_ties() -> None:
    p = _three_constraint_prompt()
    responses = [
        "The moon, so bright.",  # 0 met
        "<<moon>>\nThe moon is bright. That is all.",  # 3 met
        "<<moon>>\nThe moon, so bright.",  # 1 met (title)
        "The moon is bright. That is all.",  # 2 met (no comma, end)
        "The moon is bright tonight.",  # 1 met (no comma)
    ]
    r = rank(p, responses)
    assert r.responses == (responses[1], responses[3], responses[2], responses[4], responses[0])
    assert r.scores == (3, 2, 1, 1, 0)
    assert r.ranks == (1, 2, 3, 3, 4)  # the two 1-met answers tie; order within a tie is sampled
    assert not r.all_tied
    assert rank(p, ["a, b", "c, d"]).all_tied
    with pytest.raises(ValueError, match="K >= 2"):
        rank(p, ["only one"])


def test_export_rows_follow_the_interface(tmp_path: Path) -> None:
    p = _three_constraint_prompt()
    r = rank(p, ["<<m>>, x", "<<moon>>\nThe moon is bright. That is all.",
                 "<<a>> b, c", "<<x>>, y"])  # fmt: skip
    text = "<|im_start|>user\n" + p.prompt + "<|im_end|>\n<|im_start|>assistant\n"
    row = ranking_row(r, text, model_version="v0")
    assert set(row) >= {"feedback_id", "completion_id", "model_version", "user_id", "prompt",
                        "prompt_text", "response_ids", "responses", "ranks"}  # fmt: skip
    assert row["feedback_id"].startswith("fb-") and len(row["feedback_id"]) == 35
    assert row["completion_id"].startswith("cmpl-") and len(row["completion_id"]) == 37
    assert all(i.startswith("resp-") and len(i) == 37 for i in row["response_ids"])
    assert len(set(row["response_ids"])) == 4
    assert row["prompt_text"] == text and row["prompt"] == p.prompt
    assert row["responses"][0] == "<<moon>>\nThe moon is bright. That is all."
    assert row["ranks"] == [1, 2, 2, 2]
    assert ranking_row(r, text, "v0") == row  # content-derived ids: a rerun gives the same row
    # Preferences: pairs with the first (3 strict), the 3 tied pairs among the rest left out.
    pairs, ties = preference_rows(row)
    assert ties == 3 and len(pairs) == 3
    assert all(q["chosen"] == row["responses"][0] for q in pairs)
    assert {q["rejected"] for q in pairs} == set(row["responses"][1:])

    all_tied = rank(p, ["a, b", "c, d"])
    s = write_export(tmp_path / "exp", [(r, text), (all_tied, text)], model_version="v0",
                     sft_rows=[{"prompt": p.prompt, "prompt_text": text, "completion": "x"}],
                     ptx_rows=[{"text": "hello"}])  # fmt: skip
    assert s.all_tied_dropped == 1 and s.tied_pairs_omitted == 3
    lines = (tmp_path / "exp" / "rankings.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [row]
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["feedback_ids"] == [row["feedback_id"]]
    assert manifest["counts"] == {"rankings.jsonl": 1, "preferences.jsonl": 3, "sft.jsonl": 1,
                                  "ptx.jsonl": 1, "prompts.jsonl": 0}  # fmt: skip


def test_demonstration_is_shortest_passing_finished_sample() -> None:
    p = _three_constraint_prompt()
    good_long = "<<moon>>\nThe moon is bright and round and high above the quiet town. That is all."
    good_short = "<<moon>>\nThe moon is bright and round and high tonight. That is all."
    cs = [
        Completion("t", "The moon, so bright.", True, 6),
        Completion("t", good_long, True, 20),
        Completion("t", good_short, False, 16),  # cut at max_tokens: not a demonstration
    ]
    assert pick_demonstration(p, cs).text == good_long  # type: ignore[union-attr]
    assert pick_demonstration(p, cs, require_eos=False).text == good_short  # type: ignore[union-attr]
    assert pick_demonstration(p, cs[:1]) is None
    # Meeting every check is not enough: a near-empty answer is no demonstration to imitate.
    bare = Completion("t", "<<moon>>\nBright moon. That is all.", True, 9)
    assert pick_demonstration(p, [*cs, bare]).text == good_long  # type: ignore[union-attr]


def test_paired_gain_points_are_exact_at_a_target_boundary() -> None:
    """0.275 -> 0.375 on 200 prompts is +10.0, not the 9.999... of subtracting accuracies,
    which read as a missed ">= 10" target (seen in the learning benchmark)."""
    n = 200
    flags = [(i < 55, i < 75) for i in range(n)]  # 55 right before, 75 after (20 gained)
    before = IFEvalAccuracy(55 / n, 0.0, n, n, {}, tuple(b for b, _ in flags))
    after = IFEvalAccuracy(75 / n, 0.0, n, n, {}, tuple(a for _, a in flags))
    assert 100 * (after.prompt_level - before.prompt_level) < 10  # the float trap
    assert paired_gain(before, after).points == 10.0
