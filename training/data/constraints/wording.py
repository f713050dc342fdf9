"""How each instruction is worded: paraphrases written from the checker's arguments, split into
train and held-out ones, with IFEval's own description as one more held-out wording."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from instructloop.training.data.constraints.checkers import load_ifeval
from instructloop.training.data.constraints.templates import Split

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
        checker = load_ifeval().registry.INSTRUCTION_DICT[iid](iid)
        return str(checker.build_description(**kwargs))
    return template.format(**_fields(iid, kwargs))
