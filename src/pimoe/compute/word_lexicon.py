"""The vocabulary of the composed training phrasings (:mod:`pimoe.compute.word_compose`).

General English written for that grammar: who holds the items, containers, verbs of each
operation (active and passive), second holders and places for amounts kept apart, connectives,
question wordings per kind of question and the answer wordings. No phrasing of the held-out sets
(``tests/compute/test_word_compose.py`` checks the composed questions against them).
"""

from __future__ import annotations

import random

WHO = (
    "Ava", "Ben", "Lena", "Raj", "Mia", "Theo", "Sara", "Ivan", "Noor", "Paulo",
    "a farmer", "a librarian", "the school", "a bakery", "the museum", "our club",
    "a warehouse", "the market", "a teacher", "the hotel", "a sailor", "the zoo",
)  # fmt: skip
BOXES = (
    ("box", "boxes"), ("crate", "crates"), ("bag", "bags"), ("basket", "baskets"),
    ("shelf", "shelves"), ("jar", "jars"), ("tray", "trays"), ("pack", "packs"),
    ("carton", "cartons"), ("bucket", "buckets"), ("drawer", "drawers"), ("bin", "bins"),
)  # fmt: skip
BIG = (
    ("truck", "trucks"), ("room", "rooms"), ("store", "stores"), ("ship", "ships"),
    ("hall", "halls"), ("barn", "barns"), ("van", "vans"), ("building", "buildings"),
)  # fmt: skip
PEOPLE = (
    "friends", "children", "students", "workers", "tables", "classes", "teams",
    "families", "groups", "neighbours", "boxes", "days",
)  # fmt: skip
HAVE = ("had", "owned", "kept", "started with", "began with", "held", "stored", "counted")
LOSE = (
    "sold", "gave away", "lost", "used", "donated", "threw out", "spent", "broke",
    "lent out", "mailed", "ate", "returned",
)  # fmt: skip
LOST_PASSIVE = (
    "were sold", "were lost", "broke", "were given away", "got damaged", "were thrown out",
    "were used up", "disappeared", "were eaten", "were returned", "went missing", "spoiled",
)  # fmt: skip
GAIN = (
    "bought", "found", "received", "got", "collected", "won", "made", "picked up", "earned",
    "was given", "added", "ordered",
)  # fmt: skip
GAINED_PASSIVE = (
    "arrived", "were added", "were delivered", "came in", "were bought", "were found",
    "turned up", "were brought", "were donated", "were returned",
)  # fmt: skip
OTHER = (
    "a neighbour", "the owner", "a helper", "her brother", "the cook", "a guard", "the manager",
    "his sister", "the driver", "a cousin", "the coach", "a visitor",
)  # fmt: skip
SPOT = (
    "at home", "in the van", "on a shelf", "in storage", "by the door", "in the back room",
    "on the desk", "in a drawer", "in the garage", "at the office",
)  # fmt: skip
MORE = ("another", "a further", "an extra", "an additional")
THEN = ("Then", "Later", "After that", "Next", "Afterwards", "The next day")
HOLD = ("holds", "has", "contains", "carries", "keeps")
SHARE = ("shared", "split", "divided", "handed out", "gave out", "spread")
EVENLY = ("equally", "evenly", "in equal parts", "fairly")
COST = ("costs", "sells for", "is priced at", "weighs", "is worth")
UNIT = ("dollars", "coins", "cents", "grams", "points")
NOW = (
    "How many {item} are there now?", "How many {item} now?", "How many {item} are left now?",
    "What is the count now?", "How many {item} does that make?", "What is the new total?",
)  # fmt: skip
TOTAL = (
    "How many {item} are there in total?", "How many {item} in all?", "What is the total?",
    "How many {item} altogether?", "Find the total number of {item}.", "What is the count?",
)  # fmt: skip
EACH = (
    "How many {item} does each get?", "How many {item} per one?", "How many go to each?",
    "What is each share?", "How many {item} is one share?", "How many {item} in each?",
)  # fmt: skip
VALUE = (
    "What is the total?", "How much is that in all?", "What do they come to?",
    "How much altogether?", "What is the total amount?",
)  # fmt: skip
ANSWERS = {
    "now": ("There are {r} {item} now.", "The count is {r}.", "Now {r} {item}."),
    "total": ("There are {r} {item} in total.", "The total is {r}.", "{r} {item} in all."),
    "each": ("Each gets {r} {item}.", "One share is {r} {item}.", "{r} {item} each."),
    "value": ("The total is {r}.", "It comes to {r}.", "{r} in all."),
}


def groups_phrase(rng: random.Random, a: str, b: str) -> str:
    """A sentence or phrase naming ``a`` containers of ``b`` items each (clause order varies)."""
    box, boxes = rng.choice(BOXES)
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


def share_phrase(rng: random.Random, what: str, c: str) -> str:
    people, evenly = rng.choice(PEOPLE), rng.choice(EVENLY)
    return rng.choice(
        (
            f"{rng.choice(SHARE)} {what} {evenly} among {c} {people}",
            f"put {what} into {c} equal piles",
            f"gave {what} {evenly} to {c} {people}",
        )
    )


def aside_phrase(rng: random.Random, c: str) -> str:
    """A clause adding ``c`` items held apart: by a second holder or in another spot."""
    other, more, spot = rng.choice(OTHER), rng.choice(MORE), rng.choice(SPOT)
    return rng.choice(
        (
            f"{other} {rng.choice(('keeps', 'has', 'holds', 'stores', 'owns'))} {more} {c}",
            f"{other} {rng.choice(('brings', 'adds', 'sets down', 'puts in'))} {more} {c}",
            f"{more} {c} {{item}} are {spot}",
            f"{other} has {c} more {spot}",
            f"{c} others are kept {spot}",
        )
    )


def each_of_phrase(rng: random.Random, a: str, b: str) -> str:
    """``a`` containers with ``b`` items each, the quantity of each named after its verb."""
    boxes = rng.choice(BOXES)[1]
    return rng.choice(
        (
            f"in each of the {a} {boxes} there are {b} {{item}}",
            f"each of the {a} {boxes} {rng.choice(HOLD)} {b} {{item}}",
            f"inside every one of {a} {boxes} are {b} {{item}}",
            f"the {a} {boxes} {rng.choice(HOLD[:3])} {b} {{item}} apiece",
        )
    )
