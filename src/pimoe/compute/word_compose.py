"""Composed training phrasings: word-problem questions built clause by clause by a rule-based grammar.

Where :mod:`pimoe.compute.word_grammar` expands a few dozen whole-sentence frames, this module
composes a question from independent parts, each drawn at random: who holds the items, the clause
of each operation (many verbs per operation: taking away, adding, grouping, sharing out, pricing),
the connectives between clauses, the order in which the operands are named (the story in time
order, the question first, the start amount last, the divisor or the price first), the
sentence's shape (an amount held apart by a second holder or in another place, "another {c}";
an amount per container stated after its verb, "in each of the {a} jars there are {b}";
relative clauses, "of the {a} that Ava had, ...") and the question's wording. Every draw is a :class:`~pimoe.compute.word_patterns.Template` of one of the
:data:`PATTERNS`, so the operands' roles come from the placeholders as for every other phrasing.

The vocabulary (:mod:`pimoe.compute.word_lexicon`) is general English written for it (no phrasing of the held-out sets;
``tests/compute/test_word_compose.py`` checks that no held-out clause of more than four words
occurs in a composed question). :func:`composed_templates` is a pure function of its arguments.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pimoe.compute.word_lexicon import (
    ANSWERS,
    BIG,
    BOXES,
    COST,
    EACH,
    EVENLY,
    GAIN,
    GAINED_PASSIVE,
    HAVE,
    HOLD,
    LOSE,
    LOST_PASSIVE,
    MORE,
    NOW,
    OTHER,
    PEOPLE,
    SPOT,
    THEN,
    TOTAL,
    UNIT,
    VALUE,
    WHO,
    aside_phrase,
    each_of_phrase,
    groups_phrase,
    share_phrase,
)
from pimoe.compute.word_patterns import PATTERNS, Template
from pimoe.compute.word_problems import WordProblem, WordProblemSet

COMPOSED_OFFSET = 1_000_000  # composed problems' indices: operands apart from the other problems


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _start_loss_gain(rng: random.Random, loss: str, gains: list[str], start: str) -> str:
    """A story: ``start`` items, then ``gains`` (added amounts) and ``loss`` (taken away) in the
    order the caller's pattern reads; returns the story's sentences (no question)."""
    who = rng.choice(WHO)
    opening = rng.choice(
        (
            f"{_cap(who)} {rng.choice(HAVE)} {start} {{item}}.",
            f"There were {start} {{item}} in the {rng.choice(BOXES)[0]}.",
            f"At first {who} {rng.choice(HAVE)} {start} {{item}}.",
        )
    )
    taken = rng.choice(
        (f"{who} {rng.choice(LOSE)} {loss}", f"{loss} of them {rng.choice(LOST_PASSIVE)}")
    )
    added = [
        rng.choice((f"{who} {rng.choice(GAIN)} {g} more", f"{g} more {rng.choice(GAINED_PASSIVE)}"))
        for g in gains
    ]
    return opening + " " + " ".join(f"{rng.choice(THEN)} {s}." for s in [taken, *added])


def _p0(rng: random.Random) -> tuple[str, str]:  # {a}-{b}+{c}
    who, lose, gain = rng.choice(WHO), rng.choice(LOSE), rng.choice(GAIN)
    forms = (
        lambda: _start_loss_gain(rng, "{b}", ["{c}"], "{a}") + " " + rng.choice(NOW),
        lambda: (
            f"{_cap(who)} {rng.choice(HAVE)} {{a}} {{item}}, {lose} {{b}} and {gain} {{c}}. "
            + rng.choice(NOW)
        ),
        lambda: (
            f"How many {{item}} does {who} have after starting with {{a}}, losing {{b}} "
            f"and getting {{c}} more?"
        ),
        lambda: (
            f"{_cap(who)} {lose} {{b}} {{item}} and then {gain} {{c}}. "
            f"Before that there were {{a}}. " + rng.choice(NOW)
        ),
        lambda: (
            f"If {{c}} {{item}} {rng.choice(GAINED_PASSIVE)} after {{b}} of {{a}} "
            f"{rng.choice(LOST_PASSIVE)}, how many are there?"
        ),
        lambda: (
            f"Of the {{a}} {{item}} that {who} {rng.choice(HAVE)}, {who} {lose} {{b}}; then "
            f"{aside_phrase(rng, '{c}')}. " + rng.choice(NOW)
        ),
        lambda: (
            f"Of the {{a}} {{item}} {who} {rng.choice(HAVE)}, {{b}} {rng.choice(LOST_PASSIVE)}, "
            f"and {rng.choice(OTHER)} {gain} {rng.choice(MORE)} {{c}}. " + rng.choice(NOW)
        ),
    )
    return rng.choice(forms)(), "now"


def _p1(rng: random.Random) -> tuple[str, str]:  # {a}*{b}+{c}
    who, extra = rng.choice(WHO), rng.choice(("extra", "loose", "spare", "single", "more"))
    groups = groups_phrase(rng, "{a}", "{b}")
    forms = (
        lambda: f"{_cap(who)} has {groups} and {{c}} {extra} {{item}}. " + rng.choice(TOTAL),
        lambda: f"There are {groups}, plus {{c}} {extra} {{item}}. " + rng.choice(TOTAL),
        lambda: f"{_cap(who)} has {{c}} {extra} {{item}} and also {groups}. " + rng.choice(TOTAL),
        lambda: f"How many {{item}} are there with {groups} and {{c}} {extra} ones?",
        lambda: (
            f"{_cap(who)} packed {groups}. {rng.choice(THEN)} {{c}} more "
            f"{rng.choice(GAINED_PASSIVE)}. " + rng.choice(TOTAL)
        ),
        lambda: f"{_cap(who)} has {groups}, and {aside_phrase(rng, '{c}')}. " + rng.choice(TOTAL),
        lambda: (
            f"{_cap(each_of_phrase(rng, '{a}', '{b}'))}; {aside_phrase(rng, '{c}')}. "
            + rng.choice(TOTAL)
        ),
        lambda: (
            f"Besides {{c}} {{item}} {rng.choice(SPOT)}, {who} has {groups}. " + rng.choice(TOTAL)
        ),
    )
    return rng.choice(forms)(), "total"


def _p2(rng: random.Random) -> tuple[str, str]:  # {a}*{b}-{c}
    who = rng.choice(WHO)
    groups = groups_phrase(rng, "{a}", "{b}")
    forms = (
        lambda: (
            f"{_cap(who)} has {groups}. {rng.choice(THEN)} {{c}} {{item}} "
            f"{rng.choice(LOST_PASSIVE)}. " + rng.choice(NOW)
        ),
        lambda: (
            f"{_cap(who)} had {groups} and {rng.choice(LOSE)} {{c}} of them. " + rng.choice(NOW)
        ),
        lambda: f"From {groups}, {{c}} {{item}} {rng.choice(LOST_PASSIVE)}. " + rng.choice(NOW),
        lambda: (
            f"How many {{item}} are left when {{c}} {rng.choice(LOST_PASSIVE)} out of {groups}?"
        ),
        lambda: f"{{c}} {{item}} {rng.choice(LOST_PASSIVE)} from {groups}. " + rng.choice(NOW),
        lambda: (
            f"{_cap(each_of_phrase(rng, '{a}', '{b}'))}, but {rng.choice(OTHER)} took {{c}} of them "
            "away. " + rng.choice(NOW)
        ),
        lambda: (
            f"{_cap(who)} had {groups}; {rng.choice(OTHER)} {rng.choice(LOSE)} {{c}} of those. "
            + rng.choice(NOW)
        ),
    )
    return rng.choice(forms)(), "now"


def _p3(rng: random.Random) -> tuple[str, str]:  # ({a}+{b})*{c}
    who, cost, unit = rng.choice(WHO), rng.choice(COST), rng.choice(UNIT)
    first, second = rng.choice(
        (("red", "blue"), ("big", "small"), ("old", "new"), ("left", "right"))
    )
    gain = rng.choice(GAIN)
    forms = (
        lambda: (
            f"{_cap(who)} {gain} {{a}} {{item}} and {{b}} more. Each one {cost} {{c}} {unit}. "
            + rng.choice(VALUE)
        ),
        lambda: (
            f"One {{item}} {cost} {{c}} {unit}. {_cap(who)} {gain} {{a}} and then {{b}}. "
            + rng.choice(VALUE)
        ),
        lambda: (
            f"There are {{a}} {first} and {{b}} {second} {{item}}, each at {{c}} {unit}. "
            + rng.choice(VALUE)
        ),
        lambda: (
            f"At {{c}} {unit} per {{item}}, what are {{a}} {first} and {{b}} {second} ones worth?"
        ),
        lambda: (
            f"{_cap(who)} {gain} {{a}} {{item}} on Monday and {{b}} on Friday; every one "
            f"{cost} {{c}} {unit}. " + rng.choice(VALUE)
        ),
        lambda: (
            f"{_cap(who)} has {{a}} {{item}} and {rng.choice(OTHER)} has {rng.choice(MORE)} "
            f"{{b}}. Each {cost} {{c}} {unit}. " + rng.choice(VALUE)
        ),
        lambda: (
            f"Every {{item}} {cost} {{c}} {unit}; {who} {gain} {{a}}, and "
            f"{aside_phrase(rng, '{b}')}. " + rng.choice(VALUE)
        ),
    )
    return rng.choice(forms)(), "value"


def _p4(rng: random.Random) -> tuple[str, str]:  # ({a}-{b})/{c}
    who, lose = rng.choice(WHO), rng.choice(LOSE)
    rest = rng.choice(("the rest", "the others", "what was left", "the remaining ones"))
    forms = (
        lambda: (
            f"{_cap(who)} {rng.choice(HAVE)} {{a}} {{item}}, {lose} {{b}} and "
            f"{share_phrase(rng, rest, '{c}')}. " + rng.choice(EACH)
        ),
        lambda: (
            f"{_cap(who)} {rng.choice(HAVE)} {{a}} {{item}}. {{b}} {rng.choice(LOST_PASSIVE)}. "
            f"{rng.choice(THEN)} {who} {share_phrase(rng, rest, '{c}')}. " + rng.choice(EACH)
        ),
        lambda: (
            f"{{c}} {rng.choice(PEOPLE)} share {{a}} {{item}} {rng.choice(EVENLY)} after "
            f"{{b}} {rng.choice(LOST_PASSIVE)}. " + rng.choice(EACH)
        ),
        lambda: (
            f"How many {{item}} does each of {{c}} {rng.choice(PEOPLE)} get if {{a}} are shared "
            f"{rng.choice(EVENLY)} once {{b}} {rng.choice(LOST_PASSIVE)}?"
        ),
        lambda: (
            f"Of the {{a}} {{item}} {who} {rng.choice(HAVE)}, {{b}} {rng.choice(LOST_PASSIVE)}; "
            f"{rest} went {rng.choice(EVENLY)} to {{c}} {rng.choice(PEOPLE)}. " + rng.choice(EACH)
        ),
        lambda: (
            f"{_cap(who)} {rng.choice(HAVE)} {{a}} {{item}}, but {rng.choice(OTHER)} took {{b}} "
            f"of them. {_cap(who)} {share_phrase(rng, rest, '{c}')}. " + rng.choice(EACH)
        ),
    )
    return rng.choice(forms)(), "each"


def _p5(rng: random.Random) -> tuple[str, str]:  # {a}*{b}*{c}
    big, bigs = rng.choice(BIG)
    box, boxes = rng.choice(BOXES)
    hold = rng.choice(HOLD)
    forms = (
        lambda: (
            f"There are {{a}} {bigs}. Each {big} {hold} {{b}} {boxes}, and each {box} {hold} "
            f"{{c}} {{item}}. " + rng.choice(TOTAL)
        ),
        lambda: (
            f"{{a}} {bigs} with {{b}} {boxes} each, and {{c}} {{item}} in every {box}. "
            + rng.choice(TOTAL)
        ),
        lambda: (
            f"Each {box} {hold} {{c}} {{item}}, each {big} {hold} {{b}} {boxes}, and there "
            f"are {{a}} {bigs}. " + rng.choice(TOTAL)
        ),
        lambda: (
            f"How many {{item}} are in {{a}} {bigs} if each has {{b}} {boxes} of {{c}} {{item}}?"
        ),
        lambda: (
            f"In each of the {{a}} {bigs} there are {{b}} {boxes}, and inside every {box} are "
            f"{{c}} {{item}}. " + rng.choice(TOTAL)
        ),
        lambda: (
            f"{_cap(rng.choice(WHO))} has {{a}} {bigs}; each of them {hold} {{b}} {boxes} with "
            f"{{c}} {{item}} apiece. " + rng.choice(TOTAL)
        ),
    )
    return rng.choice(forms)(), "total"


def _p6(rng: random.Random) -> tuple[str, str]:  # {a}+{b}+{c}-{d}
    who, gain = rng.choice(WHO), rng.choice(GAIN)
    forms = (
        lambda: (
            f"{_cap(who)} {gain} {{a}} {{item}}, then {{b}}, then {{c}}, and "
            f"{rng.choice(LOSE)} {{d}}. " + rng.choice(NOW)
        ),
        lambda: (
            f"{_cap(who)} {gain} {{a}}, {{b}} and {{c}} {{item}}. {rng.choice(THEN)} {{d}} "
            f"{rng.choice(LOST_PASSIVE)}. " + rng.choice(NOW)
        ),
        lambda: (
            f"Three {rng.choice(BOXES)[1]} hold {{a}}, {{b}} and {{c}} {{item}}; {{d}} "
            f"{rng.choice(LOST_PASSIVE)}. " + rng.choice(NOW)
        ),
        lambda: (
            f"How many {{item}} are left if {{d}} {rng.choice(LOST_PASSIVE)} from {{a}}, "
            f"{{b}} and {{c}}?"
        ),
        lambda: (
            f"On three days {who} {gain} {{a}}, {{b}} and {{c}} {{item}} but {rng.choice(LOSE)} "
            f"{{d}}. " + rng.choice(NOW)
        ),
        lambda: (
            f"{_cap(who)} has {{a}} {{item}}, {rng.choice(OTHER)} has {rng.choice(MORE)} {{b}}, "
            f"and {{c}} are {rng.choice(SPOT)}. {rng.choice(THEN)} {{d}} "
            f"{rng.choice(LOST_PASSIVE)}. " + rng.choice(NOW)
        ),
        lambda: (
            f"{{a}} {{item}} are {rng.choice(SPOT)}; {aside_phrase(rng, '{b}')}, and {who} {gain} "
            f"{{c}} more but {rng.choice(LOSE)} {{d}}. " + rng.choice(NOW)
        ),
    )
    return rng.choice(forms)(), "now"


def _p7(rng: random.Random) -> tuple[str, str]:  # ({a}+{b})/{c}
    who, gain = rng.choice(WHO), rng.choice(GAIN)
    all_ = rng.choice(("them all", "all of them", "the whole lot", "everything"))
    forms = (
        lambda: (
            f"{_cap(who)} {rng.choice(HAVE)} {{a}} {{item}}, {gain} {{b}} more and "
            f"{share_phrase(rng, all_, '{c}')}. " + rng.choice(EACH)
        ),
        lambda: (
            f"{_cap(who)} {rng.choice(HAVE)} {{a}} {{item}}. {{b}} more "
            f"{rng.choice(GAINED_PASSIVE)}. {rng.choice(THEN)} {who} {share_phrase(rng, all_, '{c}')}. "
            + rng.choice(EACH)
        ),
        lambda: (
            f"{{c}} {rng.choice(PEOPLE)} share {{a}} {{item}} and {{b}} more {{item}} "
            f"{rng.choice(EVENLY)}. " + rng.choice(EACH)
        ),
        lambda: (
            f"How many {{item}} does each of {{c}} {rng.choice(PEOPLE)} get if {{a}} and {{b}} "
            f"more are shared {rng.choice(EVENLY)}?"
        ),
        lambda: (
            f"{_cap(who)} has {{a}} {{item}} and {aside_phrase(rng, '{b}')}. "
            f"Then they {share_phrase(rng, all_, '{c}')}. " + rng.choice(EACH)
        ),
        lambda: (
            f"The {{a}} {{item}} of {who} and {rng.choice(MORE)} {{b}} from {rng.choice(OTHER)} "
            f"are {rng.choice(('shared', 'split', 'divided'))} {rng.choice(EVENLY)} among {{c}} "
            f"{rng.choice(PEOPLE)}. " + rng.choice(EACH)
        ),
        lambda: (
            f"{{c}} {rng.choice(PEOPLE)} get equal shares of {{a}} {{item}} plus {rng.choice(MORE)} "
            f"{{b}}. " + rng.choice(EACH)
        ),
    )
    return rng.choice(forms)(), "each"


_BUILDERS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _p0, _p1, _p2, _p3, _p4, _p5, _p6, _p7,
)  # fmt: skip


def compose(pattern: int, rng: random.Random) -> Template:
    """One composed phrasing of ``PATTERNS[pattern]``, drawn with ``rng``."""
    if not 0 <= pattern < len(PATTERNS):
        raise ValueError(f"pattern must be in 0..{len(PATTERNS) - 1}, got {pattern}")
    question, kind = _BUILDERS[pattern](rng)
    return Template(PATTERNS[pattern], _cap(question), rng.choice(ANSWERS[kind]))


def composed_templates(count: int, seed: int = 0) -> tuple[Template, ...]:
    """``count`` distinct composed phrasings, the patterns in turn (a pure function of the arguments)."""
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    rng = random.Random(f"compose/{seed}")
    out: dict[str, Template] = {}
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 50 * count + 100:
            raise ValueError(f"the grammar cannot give {count} distinct phrasings")
        t = compose(len(out) % len(PATTERNS), rng)
        out.setdefault(t.question, t)
    return tuple(out.values())


def composed_problems(problems: WordProblemSet, count: int) -> list[WordProblem]:
    """``count`` training problems of ``problems``, each with its own composed phrasing
    (:func:`composed_templates`) and training operand lengths."""
    return [
        problems.problem("train", COMPOSED_OFFSET + i, templates=(t,))
        for i, t in enumerate(composed_templates(count))
    ]
