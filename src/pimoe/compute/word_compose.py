"""Composed training phrasings: word-problem questions built clause by clause by a rule-based grammar.

Where :mod:`pimoe.compute.word_grammar` expands a few dozen whole-sentence frames, this module
composes a question from independent parts, each drawn at random: who holds the items, the clause
of each operation (many verbs per operation: taking away, adding, grouping, sharing out, pricing),
the connectives between clauses, the order in which the operands are named (the story in time
order, the question first, the start amount last, the divisor or the price first) and the
question's wording. Every draw is a :class:`~pimoe.compute.word_patterns.Template` of one of the
:data:`PATTERNS`, so the operands' roles come from the placeholders as for every other phrasing.

The vocabulary is general English written for this module (no phrasing of the held-out sets;
``tests/compute/test_word_compose.py`` checks that no held-out clause of more than four words
occurs in a composed question). :func:`composed_templates` is a pure function of its arguments.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pimoe.compute.word_patterns import PATTERNS, Template
from pimoe.compute.word_problems import WordProblem, WordProblemSet

COMPOSED_OFFSET = 1_000_000  # composed problems' indices: operands apart from the other problems

_WHO = (
    "Ava", "Ben", "Lena", "Raj", "Mia", "Theo", "Sara", "Ivan", "Noor", "Paulo",
    "a farmer", "a librarian", "the school", "a bakery", "the museum", "our club",
    "a warehouse", "the market", "a teacher", "the hotel", "a sailor", "the zoo",
)  # fmt: skip
_BOXES = (
    ("box", "boxes"), ("crate", "crates"), ("bag", "bags"), ("basket", "baskets"),
    ("shelf", "shelves"), ("jar", "jars"), ("tray", "trays"), ("pack", "packs"),
    ("carton", "cartons"), ("bucket", "buckets"), ("drawer", "drawers"), ("bin", "bins"),
)  # fmt: skip
_BIG = (
    ("truck", "trucks"), ("room", "rooms"), ("store", "stores"), ("ship", "ships"),
    ("hall", "halls"), ("barn", "barns"), ("van", "vans"), ("building", "buildings"),
)  # fmt: skip
_PEOPLE = (
    "friends", "children", "students", "workers", "tables", "classes", "teams",
    "families", "groups", "neighbours", "boxes", "days",
)  # fmt: skip
_HAVE = ("had", "owned", "kept", "started with", "began with", "held", "stored", "counted")
_LOSE = (
    "sold", "gave away", "lost", "used", "donated", "threw out", "spent", "broke",
    "lent out", "mailed", "ate", "returned",
)  # fmt: skip
_LOST_PASSIVE = (
    "were sold", "were lost", "broke", "were given away", "got damaged", "were thrown out",
    "were used up", "disappeared", "were eaten", "were returned", "went missing", "spoiled",
)  # fmt: skip
_GAIN = (
    "bought", "found", "received", "got", "collected", "won", "made", "picked up", "earned",
    "was given", "added", "ordered",
)  # fmt: skip
_GAINED_PASSIVE = (
    "arrived", "were added", "were delivered", "came in", "were bought", "were found",
    "turned up", "were brought", "were donated", "were returned",
)  # fmt: skip
_THEN = ("Then", "Later", "After that", "Next", "Afterwards", "The next day")
_HOLD = ("holds", "has", "contains", "carries", "keeps")
_SHARE = ("shared", "split", "divided", "handed out", "gave out", "spread")
_EVENLY = ("equally", "evenly", "in equal parts", "fairly")
_COST = ("costs", "sells for", "is priced at", "weighs", "is worth")
_UNIT = ("dollars", "coins", "cents", "grams", "points")
_NOW = (
    "How many {item} are there now?", "How many {item} now?", "How many {item} are left now?",
    "What is the count now?", "How many {item} does that make?", "What is the new total?",
)  # fmt: skip
_TOTAL = (
    "How many {item} are there in total?", "How many {item} in all?", "What is the total?",
    "How many {item} altogether?", "Find the total number of {item}.", "What is the count?",
)  # fmt: skip
_EACH = (
    "How many {item} does each get?", "How many {item} per one?", "How many go to each?",
    "What is each share?", "How many {item} is one share?", "How many {item} in each?",
)  # fmt: skip
_VALUE = (
    "What is the total?", "How much is that in all?", "What do they come to?",
    "How much altogether?", "What is the total amount?",
)  # fmt: skip
_ANSWERS = {
    "now": ("There are {r} {item} now.", "The count is {r}.", "Now {r} {item}."),
    "total": ("There are {r} {item} in total.", "The total is {r}.", "{r} {item} in all."),
    "each": ("Each gets {r} {item}.", "One share is {r} {item}.", "{r} {item} each."),
    "value": ("The total is {r}.", "It comes to {r}.", "{r} in all."),
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _groups(rng: random.Random, a: str, b: str) -> str:
    """A sentence or phrase naming ``a`` containers of ``b`` items each (clause order varies)."""
    box, boxes = rng.choice(_BOXES)
    return rng.choice(
        (
            f"{a} {boxes} of {b} {{item}}",
            f"{a} {boxes} with {b} {{item}} each",
            f"{a} {boxes}, each with {b} {{item}}",
            f"{a} {boxes} that each hold {b} {{item}}",
            f"{b} {{item}} in each of {a} {boxes}",
            f"{b} {{item}} per {box} in {a} {boxes}",
        )
    )


def _start_loss_gain(rng: random.Random, loss: str, gains: list[str], start: str) -> str:
    """A story: ``start`` items, then ``gains`` (added amounts) and ``loss`` (taken away) in the
    order the caller's pattern reads; returns the story's sentences (no question)."""
    who = rng.choice(_WHO)
    opening = rng.choice(
        (
            f"{_cap(who)} {rng.choice(_HAVE)} {start} {{item}}.",
            f"There were {start} {{item}} in the {rng.choice(_BOXES)[0]}.",
            f"At first {who} {rng.choice(_HAVE)} {start} {{item}}.",
        )
    )
    taken = rng.choice(
        (f"{who} {rng.choice(_LOSE)} {loss}", f"{loss} of them {rng.choice(_LOST_PASSIVE)}")
    )
    added = [
        rng.choice(
            (f"{who} {rng.choice(_GAIN)} {g} more", f"{g} more {rng.choice(_GAINED_PASSIVE)}")
        )
        for g in gains
    ]
    return opening + " " + " ".join(f"{rng.choice(_THEN)} {s}." for s in [taken, *added])


def _p0(rng: random.Random) -> tuple[str, str]:  # {a}-{b}+{c}
    who, lose, gain = rng.choice(_WHO), rng.choice(_LOSE), rng.choice(_GAIN)
    forms = (
        lambda: _start_loss_gain(rng, "{b}", ["{c}"], "{a}") + " " + rng.choice(_NOW),
        lambda: (
            f"{_cap(who)} {rng.choice(_HAVE)} {{a}} {{item}}, {lose} {{b}} and {gain} {{c}}. "
            + rng.choice(_NOW)
        ),
        lambda: (
            f"How many {{item}} does {who} have after starting with {{a}}, losing {{b}} "
            f"and getting {{c}} more?"
        ),
        lambda: (
            f"{_cap(who)} {lose} {{b}} {{item}} and then {gain} {{c}}. "
            f"Before that there were {{a}}. " + rng.choice(_NOW)
        ),
        lambda: (
            f"If {{c}} {{item}} {rng.choice(_GAINED_PASSIVE)} after {{b}} of {{a}} "
            f"{rng.choice(_LOST_PASSIVE)}, how many are there?"
        ),
    )
    return rng.choice(forms)(), "now"


def _p1(rng: random.Random) -> tuple[str, str]:  # {a}*{b}+{c}
    who, extra = rng.choice(_WHO), rng.choice(("extra", "loose", "spare", "single", "more"))
    groups = _groups(rng, "{a}", "{b}")
    forms = (
        lambda: f"{_cap(who)} has {groups} and {{c}} {extra} {{item}}. " + rng.choice(_TOTAL),
        lambda: f"There are {groups}, plus {{c}} {extra} {{item}}. " + rng.choice(_TOTAL),
        lambda: f"{_cap(who)} has {{c}} {extra} {{item}} and also {groups}. " + rng.choice(_TOTAL),
        lambda: f"How many {{item}} are there with {groups} and {{c}} {extra} ones?",
        lambda: (
            f"{_cap(who)} packed {groups}. {rng.choice(_THEN)} {{c}} more "
            f"{rng.choice(_GAINED_PASSIVE)}. " + rng.choice(_TOTAL)
        ),
    )
    return rng.choice(forms)(), "total"


def _p2(rng: random.Random) -> tuple[str, str]:  # {a}*{b}-{c}
    who = rng.choice(_WHO)
    groups = _groups(rng, "{a}", "{b}")
    forms = (
        lambda: (
            f"{_cap(who)} has {groups}. {rng.choice(_THEN)} {{c}} {{item}} "
            f"{rng.choice(_LOST_PASSIVE)}. " + rng.choice(_NOW)
        ),
        lambda: (
            f"{_cap(who)} had {groups} and {rng.choice(_LOSE)} {{c}} of them. " + rng.choice(_NOW)
        ),
        lambda: f"From {groups}, {{c}} {{item}} {rng.choice(_LOST_PASSIVE)}. " + rng.choice(_NOW),
        lambda: (
            f"How many {{item}} are left when {{c}} {rng.choice(_LOST_PASSIVE)} out of {groups}?"
        ),
        lambda: f"{{c}} {{item}} {rng.choice(_LOST_PASSIVE)} from {groups}. " + rng.choice(_NOW),
    )
    return rng.choice(forms)(), "now"


def _p3(rng: random.Random) -> tuple[str, str]:  # ({a}+{b})*{c}
    who, cost, unit = rng.choice(_WHO), rng.choice(_COST), rng.choice(_UNIT)
    first, second = rng.choice(
        (("red", "blue"), ("big", "small"), ("old", "new"), ("left", "right"))
    )
    gain = rng.choice(_GAIN)
    forms = (
        lambda: (
            f"{_cap(who)} {gain} {{a}} {{item}} and {{b}} more. Each one {cost} {{c}} {unit}. "
            + rng.choice(_VALUE)
        ),
        lambda: (
            f"One {{item}} {cost} {{c}} {unit}. {_cap(who)} {gain} {{a}} and then {{b}}. "
            + rng.choice(_VALUE)
        ),
        lambda: (
            f"There are {{a}} {first} and {{b}} {second} {{item}}, each at {{c}} {unit}. "
            + rng.choice(_VALUE)
        ),
        lambda: (
            f"At {{c}} {unit} per {{item}}, what are {{a}} {first} and {{b}} {second} ones worth?"
        ),
        lambda: (
            f"{_cap(who)} {gain} {{a}} {{item}} on Monday and {{b}} on Friday; every one "
            f"{cost} {{c}} {unit}. " + rng.choice(_VALUE)
        ),
    )
    return rng.choice(forms)(), "value"


def _share(rng: random.Random, what: str, c: str) -> str:
    people, evenly = rng.choice(_PEOPLE), rng.choice(_EVENLY)
    return rng.choice(
        (
            f"{rng.choice(_SHARE)} {what} {evenly} among {c} {people}",
            f"put {what} into {c} equal piles",
            f"gave {what} {evenly} to {c} {people}",
        )
    )


def _p4(rng: random.Random) -> tuple[str, str]:  # ({a}-{b})/{c}
    who, lose = rng.choice(_WHO), rng.choice(_LOSE)
    rest = rng.choice(("the rest", "the others", "what was left", "the remaining ones"))
    forms = (
        lambda: (
            f"{_cap(who)} {rng.choice(_HAVE)} {{a}} {{item}}, {lose} {{b}} and "
            f"{_share(rng, rest, '{c}')}. " + rng.choice(_EACH)
        ),
        lambda: (
            f"{_cap(who)} {rng.choice(_HAVE)} {{a}} {{item}}. {{b}} {rng.choice(_LOST_PASSIVE)}. "
            f"{rng.choice(_THEN)} {who} {_share(rng, rest, '{c}')}. " + rng.choice(_EACH)
        ),
        lambda: (
            f"{{c}} {rng.choice(_PEOPLE)} share {{a}} {{item}} {rng.choice(_EVENLY)} after "
            f"{{b}} {rng.choice(_LOST_PASSIVE)}. " + rng.choice(_EACH)
        ),
        lambda: (
            f"How many {{item}} does each of {{c}} {rng.choice(_PEOPLE)} get if {{a}} are shared "
            f"{rng.choice(_EVENLY)} once {{b}} {rng.choice(_LOST_PASSIVE)}?"
        ),
    )
    return rng.choice(forms)(), "each"


def _p5(rng: random.Random) -> tuple[str, str]:  # {a}*{b}*{c}
    big, bigs = rng.choice(_BIG)
    box, boxes = rng.choice(_BOXES)
    hold = rng.choice(_HOLD)
    forms = (
        lambda: (
            f"There are {{a}} {bigs}. Each {big} {hold} {{b}} {boxes}, and each {box} {hold} "
            f"{{c}} {{item}}. " + rng.choice(_TOTAL)
        ),
        lambda: (
            f"{{a}} {bigs} with {{b}} {boxes} each, and {{c}} {{item}} in every {box}. "
            + rng.choice(_TOTAL)
        ),
        lambda: (
            f"Each {box} {hold} {{c}} {{item}}, each {big} {hold} {{b}} {boxes}, and there "
            f"are {{a}} {bigs}. " + rng.choice(_TOTAL)
        ),
        lambda: (
            f"How many {{item}} are in {{a}} {bigs} if each has {{b}} {boxes} of {{c}} {{item}}?"
        ),
    )
    return rng.choice(forms)(), "total"


def _p6(rng: random.Random) -> tuple[str, str]:  # {a}+{b}+{c}-{d}
    who, gain = rng.choice(_WHO), rng.choice(_GAIN)
    forms = (
        lambda: (
            f"{_cap(who)} {gain} {{a}} {{item}}, then {{b}}, then {{c}}, and "
            f"{rng.choice(_LOSE)} {{d}}. " + rng.choice(_NOW)
        ),
        lambda: (
            f"{_cap(who)} {gain} {{a}}, {{b}} and {{c}} {{item}}. {rng.choice(_THEN)} {{d}} "
            f"{rng.choice(_LOST_PASSIVE)}. " + rng.choice(_NOW)
        ),
        lambda: (
            f"Three {rng.choice(_BOXES)[1]} hold {{a}}, {{b}} and {{c}} {{item}}; {{d}} "
            f"{rng.choice(_LOST_PASSIVE)}. " + rng.choice(_NOW)
        ),
        lambda: (
            f"How many {{item}} are left if {{d}} {rng.choice(_LOST_PASSIVE)} from {{a}}, "
            f"{{b}} and {{c}}?"
        ),
        lambda: (
            f"On three days {who} {gain} {{a}}, {{b}} and {{c}} {{item}} but {rng.choice(_LOSE)} "
            f"{{d}}. " + rng.choice(_NOW)
        ),
    )
    return rng.choice(forms)(), "now"


def _p7(rng: random.Random) -> tuple[str, str]:  # ({a}+{b})/{c}
    who, gain = rng.choice(_WHO), rng.choice(_GAIN)
    all_ = rng.choice(("them all", "all of them", "the whole lot", "everything"))
    forms = (
        lambda: (
            f"{_cap(who)} {rng.choice(_HAVE)} {{a}} {{item}}, {gain} {{b}} more and "
            f"{_share(rng, all_, '{c}')}. " + rng.choice(_EACH)
        ),
        lambda: (
            f"{_cap(who)} {rng.choice(_HAVE)} {{a}} {{item}}. {{b}} more "
            f"{rng.choice(_GAINED_PASSIVE)}. {rng.choice(_THEN)} {who} {_share(rng, all_, '{c}')}. "
            + rng.choice(_EACH)
        ),
        lambda: (
            f"{{c}} {rng.choice(_PEOPLE)} share {{a}} {{item}} and {{b}} more {{item}} "
            f"{rng.choice(_EVENLY)}. " + rng.choice(_EACH)
        ),
        lambda: (
            f"How many {{item}} does each of {{c}} {rng.choice(_PEOPLE)} get if {{a}} and {{b}} "
            f"more are shared {rng.choice(_EVENLY)}?"
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
    return Template(PATTERNS[pattern], _cap(question), rng.choice(_ANSWERS[kind]))


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
