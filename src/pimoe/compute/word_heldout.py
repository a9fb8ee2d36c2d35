"""The hand-written held-out phrasings: 3 per pattern, never seen in training (see
:mod:`pimoe.compute.word_templates` for the three sets)."""

from __future__ import annotations

from pimoe.compute.word_patterns import PATTERNS, Template

_T = Template
HELDOUT_WRITTEN: tuple[Template, ...] = (
    _T(
        PATTERNS[0],
        "After selling {b} {item} and buying {c}, how many {item} does a trader who started with {a} own?",
        "The trader owns {r} {item}.",
    ),
    _T(
        PATTERNS[1],
        "Add {c} spare {item} to {a} bundles of {b} {item}. What is the count?",
        "The count is {r}.",
    ),
    _T(
        PATTERNS[2],
        "{a} bags hold {b} {item} apiece; {c} {item} go missing. How many {item} remain?",
        "{r} {item} remain.",
    ),
    _T(
        PATTERNS[3],
        "The price per {item} is {c} coins. Jo buys {a} and Kim buys {b}. What do they pay together?",
        "Together they pay {r} coins.",
    ),
    _T(
        PATTERNS[4],
        "{c} friends split what is left of {a} {item} once {b} are eaten. What is each share?",
        "Each share is {r} {item}.",
    ),
    _T(
        PATTERNS[5],
        "How many {item} fit in {a} halls that have {b} rows of {c} {item} each?",
        "Exactly {r} {item} fit.",
    ),
    _T(
        PATTERNS[6],
        "Three crews gathered {a}, {b} and {c} {item}; {d} were discarded. What is the final tally?",
        "The final tally is {r}.",
    ),
    _T(
        PATTERNS[7],
        "Pool {a} {item} with {b} more and deal them out evenly to {c} tables. How many per table?",
        "Every table gets {r} {item}.",
    ),
    _T(
        PATTERNS[0],
        "Starting from {a} {item}, a collector trades away {b} and is handed {c}. How many {item} now?",
        "The collector now has {r} {item}.",
    ),
    _T(
        PATTERNS[1],
        "{a} envelopes contain {b} {item} each, and {c} more {item} sit on a desk. How many {item} altogether?",
        "Altogether {r} {item}.",
    ),
    _T(
        PATTERNS[2],
        "Out of {a} batches of {b} {item}, {c} fail inspection. How many {item} pass?",
        "{r} {item} pass.",
    ),
    _T(
        PATTERNS[3],
        "A grower ships {a} crates on Friday and {b} on Saturday; each crate is worth {c} coins. What are the shipments worth?",
        "The shipments are worth {r} coins.",
    ),
    _T(
        PATTERNS[4],
        "A pantry held {a} {item}. Once {b} spoiled, the remainder was split evenly over {c} weeks. How many {item} per week?",
        "{r} {item} per week.",
    ),
    _T(
        PATTERNS[5],
        "{c} {item} lie in every drawer, every desk has {b} drawers, and the office has {a} desks. How many {item} in the office?",
        "The office has {r} {item}.",
    ),
    _T(
        PATTERNS[6],
        "Donations of {a}, {b} and {c} {item} came in, minus {d} that were returned. How many {item} stayed?",
        "{r} {item} stayed.",
    ),
    _T(
        PATTERNS[7],
        "Combine {a} and {b} {item}, then share them equally across {c} baskets. What does one basket get?",
        "One basket gets {r} {item}.",
    ),
    _T(
        PATTERNS[0],
        "A ferry leaves port with {a} {item} aboard. At the first stop {b} are unloaded, and at the second {c} are loaded on. What does the ferry carry afterwards?",
        "Afterwards the ferry carries {r} {item}.",
    ),
    _T(
        PATTERNS[1],
        "The gym has {a} lockers, and in every locker sit {b} {item}; the janitor keeps another {c} in a cupboard. Give the number of {item} overall.",
        "Overall the number is {r}.",
    ),
    _T(
        PATTERNS[2],
        "A mint strikes {b} {item} during each of {a} shifts, but inspectors reject {c} of them. What number of {item} get through?",
        "{r} {item} get through.",
    ),
    _T(
        PATTERNS[3],
        "Guests bought {a} tickets online and {b} at the door, paying {c} coins per ticket. What was the revenue?",
        "The revenue was {r} coins.",
    ),
    _T(
        PATTERNS[4],
        "Of the {a} {item} in a crate, {b} turned out cracked; the good ones were divided fairly among {c} neighbours. How many did one neighbour receive?",
        "One neighbour ended up with {r} {item}.",
    ),
    _T(
        PATTERNS[5],
        "Across {a} greenhouses there are {b} benches per greenhouse, with {c} {item} resting on every bench. What does that come to?",
        "It comes to {r} {item}.",
    ),
    _T(
        PATTERNS[6],
        "Over three weekends a museum welcomed {a}, {b} and {c} visitors, yet {d} of them asked for refunds. How many visitors did not ask for a refund?",
        "{r} visitors kept their tickets.",
    ),
    _T(
        PATTERNS[7],
        "If {a} {item} from the attic and {b} from the garage are sorted into {c} identical cartons, what does each carton contain?",
        "Each carton contains {r} {item}.",
    ),
)
HELDOUT_SECOND = range(8, 16)  # indices into HELDOUT_WRITTEN of the second held-out set
HELDOUT_THIRD = range(16, 24)  # the third held-out set (see pimoe.compute.word_templates)
