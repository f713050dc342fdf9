"""Simulated users judge like people: constraints met, less what a person would hold against an
answer (formatting nobody asked for; an answer too short, off the subject or repeating itself).

Hand-written answers only. Most cases are ones a constraint count alone gets wrong (each test says
what that count would have said), so they fail if the labeller goes back to counting.
"""

from __future__ import annotations

import pytest

from instructloop.training.data.constraints import ConstraintPrompt, make_prompt, score
from instructloop.training.data.simulated_labeler import rank
from instructloop.training.data.simulated_users import (
    DEGENERATE_REASONS,
    FORMATTING_FEATURES,
    FORMATTING_PENALTY,
    answer_words,
    degenerate_by_reason,
    degenerate_offset,
    degenerate_rate,
    degenerate_reasons,
    is_degenerate,
    judge,
    on_topic,
    quality_report,
    unrequested_formatting,
    unrequested_formatting_by_feature,
    unrequested_formatting_rate,
)

BLOG = "Write a short blog post about {s}."

# A real answer about honey bees: 30 words, no commas, one of the keywords ("golden").
BEES = (
    "Honey bees visit thousands of flowers every day. They carry pollen from plant to plant and "
    "help our gardens grow. A golden jar of honey is the sweet reward of their work."
)


def _prompt(ids: list[str], kwargs: list[dict] | None = None, task: str = BLOG) -> ConstraintPrompt:
    return make_prompt(task, "honey bees", ids, kwargs or [{} for _ in ids])


def _ranked_first(p: ConstraintPrompt, *answers: str) -> str:
    return rank(p, list(answers)).responses[0]


# --- the faults the learned reflexes showed -------------------------------------------------------


def test_ps_only_answer_to_a_two_keyword_prompt_loses_to_a_real_answer() -> None:
    p = _prompt(["keywords:existence"], [{"keywords": ["golden", "river"]}])
    ps_only = "P.S. I hope this helps!"
    # A count of constraints ties them (neither has both words); a person prefers the answer.
    assert score(p, ps_only) == score(p, BEES) == (0, 1)
    r = rank(p, [ps_only, BEES])
    assert r.responses == (BEES, ps_only) and r.ranks == (1, 2)
    assert set(degenerate_reasons(p, ps_only)) == {"too_short", "off_topic"}
    assert is_degenerate(p, BEES) is None

    # Even where the P.S. meets a constraint the real answer misses, the near-empty answer loses.
    p2 = _prompt(
        ["keywords:existence", "detectable_content:postscript"],
        [{"keywords": ["golden", "river"]}, {"postscript_marker": "P.S."}],
    )
    assert score(p2, ps_only) == (1, 2) and score(p2, BEES) == (0, 2)
    assert _ranked_first(p2, ps_only, BEES) == BEES


def test_unrequested_title_ranks_below_the_same_answer_without_it() -> None:
    p = _prompt(["punctuation:no_comma"])
    titled = "<<Busy Bees>>\n" + BEES
    assert score(p, titled) == score(p, BEES) == (1, 1)  # the count ties them
    assert unrequested_formatting(p, titled) == ["title"]
    r = rank(p, [titled, BEES])
    assert r.responses == (BEES, titled) and r.ranks == (1, 2)
    assert r.quality == (1.0, 1.0 - FORMATTING_PENALTY)
    # Asked for, the same title costs nothing and earns its constraint.
    pt = _prompt(["detectable_format:title"])
    assert unrequested_formatting(pt, titled) == []
    assert _ranked_first(pt, BEES, titled) == titled


def test_lowercase_answer_to_a_capitals_prompt_gets_no_credit() -> None:
    p = _prompt(["change_case:english_capital"])
    lower, caps = BEES.lower(), BEES.upper()
    j = judge(p, lower)
    assert j.met == 0 and j.unrequested == ("lowercase",)
    assert j.quality == -FORMATTING_PENALTY  # below an answer that ignored the request
    assert judge(p, caps).met == 1 and judge(p, caps).unrequested == ()
    assert rank(p, [lower, BEES, caps]).responses == (caps, BEES, lower)


def test_an_answer_repeating_one_line_five_times_is_degenerate() -> None:
    p = _prompt(["keywords:existence"], [{"keywords": ["golden"]}])
    line = "Honey bees make golden honey in the summer."
    repeated = "\n".join([line] * 5)
    assert score(p, repeated) == (1, 1)  # the checker is satisfied
    assert is_degenerate(p, repeated) == "repeated_lines"
    assert "repetitive" in degenerate_reasons(p, repeated)
    # It ranks below an on-topic answer that misses the keyword.
    plain = BEES.replace("golden", "full")
    assert score(p, plain) == (0, 1)
    assert _ranked_first(p, repeated, plain) == plain


def test_repeated_sentences_and_ngrams_are_degenerate() -> None:
    p = _prompt([])
    twice = "Bees are busy all day long. They like flowers a lot. Bees are busy all day long."
    assert degenerate_reasons(p, twice) == ["repeated_sentences"]
    loop = "bees make honey and " * 4 + "bees make honey and honey makes bees happy"
    assert "repetitive" in degenerate_reasons(p, loop)
    assert degenerate_reasons(p, BEES) == []


def test_an_off_topic_answer_is_penalised() -> None:
    p = _prompt(["punctuation:no_comma"])
    trains = (
        "Trains leave the station at dawn and cross the wide valley before the city wakes up. "
        "The passengers read and sleep."
    )
    assert score(p, trains) == (1, 1)
    assert degenerate_reasons(p, trains) == ["off_topic"]
    bees_with_comma = BEES.replace("day.", "day, and night.")
    assert score(p, bees_with_comma) == (0, 1)
    assert _ranked_first(p, trains, bees_with_comma) == bees_with_comma
    # Plural, singular and -ing forms of the subject's words count as on topic.
    assert on_topic("honey bees", "A bee came by.") and on_topic("public libraries", "My library")
    assert on_topic("mountain hiking", "We hiked up.") and not on_topic("the ocean", "The sea.")


def test_a_requested_postscript_is_not_penalised() -> None:
    p = _prompt(["detectable_content:postscript"], [{"postscript_marker": "P.S."}])
    with_ps = BEES + "\n\nP.S. Plant some lavender for them."
    j = judge(p, with_ps)
    assert j.met == 1 and j.unrequested == () and j.degenerate == () and j.quality == 1.0
    # Unasked, the same P.S. costs half a constraint.
    plain = _prompt([])
    assert judge(plain, with_ps).unrequested == ("postscript",)
    assert judge(plain, with_ps).quality == -FORMATTING_PENALTY


def test_ties_stay_ties() -> None:
    p = _prompt(["punctuation:no_comma"])
    other = (
        "Every spring the honey bees wake up and fly out to find the first flowers of the year. "
        "Their hive hums with work."
    )
    r = rank(p, [BEES, other, BEES.replace(".", ",", 1)])
    assert r.ranks == (1, 1, 2) and r.quality[0] == r.quality[1]
    assert r.responses[:2] == (BEES, other)  # sampled order kept within a tie
    # Two degenerate answers with the same constraints met tie too, whatever their reasons.
    r2 = rank(p, ["Ok.", "Trains leave the station at dawn and cross the valley."])
    assert r2.all_tied


# --- each formatting rule -------------------------------------------------------------------------

# (feature, the constraint that asks for it, the kwargs, an answer showing it)
FEATURES: list[tuple[str, str, dict, str]] = [
    ("postscript", "detectable_content:postscript", {"postscript_marker": "P.S."},
     BEES + " P.S. Thanks for reading!"),
    ("title", "detectable_format:title", {}, "<<Bees>>\n" + BEES),
    ("bullet_list", "detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Honey bees are wonderful:\n* They make honey for us.\n* They pollinate our garden flowers."),
    ("quotation", "startend:quotation", {}, '"' + BEES + '"'),
    ("lowercase", "change_case:english_lowercase", {}, BEES.lower()),
    ("all_caps", "change_case:english_capital", {}, BEES.upper()),
]  # fmt: skip


def test_every_feature_has_a_case() -> None:
    assert [f[0] for f in FEATURES] == list(FORMATTING_FEATURES)


@pytest.mark.parametrize(
    ("feature", "iid", "kwargs", "answer"), FEATURES, ids=[f[0] for f in FEATURES]
)
def test_each_feature_is_found_unrequested_and_free_when_requested(
    feature: str, iid: str, kwargs: dict, answer: str
) -> None:
    assert unrequested_formatting(_prompt([]), BEES) == []
    assert unrequested_formatting(_prompt([]), answer) == [feature]
    requested = _prompt([iid], [kwargs])
    assert unrequested_formatting(requested, answer) == []
    assert judge(requested, answer).met == 1  # and its checker agrees the answer has it
    assert degenerate_reasons(requested, answer) == []


def test_formatting_rules_are_conservative() -> None:
    p = _prompt([])
    # A one-line "- " or a numbered sentence is no list; *emphasis* and *** dividers are no bullets.
    assert unrequested_formatting(p, BEES + "\n- Enjoy.") == []
    assert unrequested_formatting(p, "*Bees* are great.\n***\n" + BEES) == []
    assert unrequested_formatting(p, "Honey bees:\n1. make honey\n2. visit flowers") == [
        "bullet_list"
    ]
    # Quotes inside the answer, a short lowercase or all-caps phrase: no case or quotation fault.
    assert unrequested_formatting(p, 'A keeper said "bees are calm" to me. ' + BEES) == []
    assert unrequested_formatting(p, "ok bees. " + BEES) == []
    assert unrequested_formatting(p, "BEES ROCK. " + BEES) == []
    # A task that invites a list allows one.
    tips = _prompt([], task="Give some practical tips about {s}.")
    assert unrequested_formatting(tips, FEATURES[2][3]) == []


def test_too_short_respects_a_requested_word_limit() -> None:
    short = "Honey bees make sweet golden honey."  # 6 words
    assert degenerate_reasons(_prompt([]), short) == ["too_short"]
    limited = _prompt(
        ["length_constraints:number_words"], [{"num_words": 20, "relation": "less than"}]
    )
    assert degenerate_reasons(limited, short) == []
    assert judge(limited, short).quality == 1.0
    # The title, a P.S. and a requested end phrase are not the answer's content.
    ended = _prompt(
        ["startend:end_checker"], [{"end_phrase": "Is there anything else I can help with?"}]
    )
    padded = (
        "<<Honey bees and their hives>>\nBees make honey. Is there anything else I can help with?"
    )
    assert score(ended, padded) == (1, 1)
    assert degenerate_reasons(ended, padded) == ["too_short"]


def test_degenerate_answers_rank_below_every_other() -> None:
    p = _prompt(
        ["keywords:existence", "detectable_content:postscript"],
        [{"keywords": ["golden"]}, {"postscript_marker": "P.S."}],
    )
    # The worst answer that is not degenerate: no constraint met, every unrequested feature it
    # can carry at once (title, list, quotation, all caps).
    worst = '"<<BEES>>\nHONEY BEES:\n* THEY MAKE HONEY ALL SUMMER.\n* THEY VISIT FLOWERS."'
    w = judge(p, worst)
    assert w.met == 0 and not w.is_degenerate and len(w.unrequested) == 4
    # The best degenerate one: every constraint met, nothing unrequested.
    best = "Golden bees.\nP.S. Bye."
    b = judge(p, best)
    assert b.met == 2 and b.unrequested == () and b.degenerate == ("too_short",)
    assert b.quality < w.quality
    assert b.quality == 2 - degenerate_offset(p)
    assert b.penalties == {"degenerate": degenerate_offset(p)}
    assert w.penalties == dict.fromkeys(w.unrequested, FORMATTING_PENALTY)
    assert rank(p, [best, worst]).responses == (worst, best)


def test_ranking_carries_each_judgement_in_ranked_order() -> None:
    p = _prompt(["punctuation:no_comma"])
    answers = ["Ok.", "<<Bees>>\n" + BEES, BEES]
    r = rank(p, answers)
    assert r.responses == (BEES, "<<Bees>>\n" + BEES, "Ok.")
    assert r.ranks == (1, 2, 3) and r.scores == (1, 1, 1)
    assert r.quality == tuple(j.quality for j in r.judgements)
    assert [j.to_json()["penalties"] for j in r.judgements] == [
        {},
        {"title": FORMATTING_PENALTY},
        {"degenerate": degenerate_offset(p)},
    ]


# --- reporting ------------------------------------------------------------------------------------


def test_reporting_helpers_by_hand() -> None:
    plain, titled_ask = _prompt([]), _prompt(["detectable_format:title"])
    prompts = [plain, plain, plain, titled_ask]
    answers = [BEES, "<<Bees>>\n" + BEES, "Ok.", "<<Bees>>\n" + BEES]
    # Three prompts ask for no formatting; one of their answers has an unasked title.
    assert unrequested_formatting_rate(prompts, answers) == pytest.approx(1 / 3)
    by = unrequested_formatting_by_feature(prompts, answers)
    assert by["title"] == pytest.approx(1 / 3) and by["postscript"] == 0.0
    assert degenerate_rate(prompts, answers) == 0.25
    reasons = degenerate_by_reason(prompts, answers)
    assert set(reasons) == set(DEGENERATE_REASONS)
    assert reasons["too_short"] == 0.25 and reasons["off_topic"] == 0.25
    words = answer_words(["one two three", "a b c d e f g h i j", "x"])
    assert words == {"n": 3, "mean": 14 / 3, "median": 3.0, "share_under_8": 2 / 3}
    rep = quality_report(prompts, answers)
    assert rep["per_instruction"] == {
        "detectable_format:title": {"n": 1, "met": 1, "accuracy": 1.0}
    }
    assert rep["unrequested_formatting_rate"] == pytest.approx(1 / 3)
    assert rep["answer_words"]["n"] == 4
    with pytest.raises(ValueError, match="formatting"):
        unrequested_formatting_rate([titled_ask], [BEES])
    assert quality_report([titled_ask], [BEES])["unrequested_formatting_rate"] is None
    with pytest.raises(ValueError, match="answers"):
        degenerate_rate(prompts, answers[:2])
