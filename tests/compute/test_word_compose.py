from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from pimoe.compute.word_compose import (
    compose,
    composed_problems,
    composed_templates,
)
from pimoe.compute.word_problems import PATTERNS, SLOTS, TEMPLATES, WordProblemSet


def test_composed_phrasings_are_distinct_and_cover_every_pattern() -> None:
    templates = composed_templates(400)
    assert len({t.question for t in templates}) == 400
    assert templates == composed_templates(400)  # a pure function of its arguments
    assert composed_templates(400, seed=1) != templates
    counts = {p: sum(t.pattern == p for t in templates) for p in PATTERNS}
    assert min(counts.values()) >= 400 // len(PATTERNS) - 1
    for t in templates:
        slots = [s for s in SLOTS if f"{{{s}}}" in t.pattern]
        for s in slots:  # every operand of the tree named once, no other slot
            assert t.question.count(f"{{{s}}}") == 1, t.question
        assert not re.search(r"\{[^}]*\}", re.sub(r"\{(item|[abcd])\}", "", t.question))
        assert "{r}" in t.answer


def test_composed_problems_have_exact_answers_and_numbers_in_slot_order() -> None:
    problems = WordProblemSet()
    composed = composed_problems(problems, 96)
    assert len({p.question for p in composed}) == 96
    assert [p.template for p in composed] == list(composed_templates(96))
    for p in composed:
        assert max(len(o) for o in p.operands) <= problems.train_digits
        names = dict(zip(SLOTS, (f"Fraction({o})" for o in p.operands)))
        assert eval(PATTERNS[p.pattern].format(**names)) == Fraction(int(p.answer))
        numbers = re.findall(r"[0-9]+", p.question)
        by_slot = sorted(range(len(numbers)), key=lambda i: p.operand_order[i])
        assert [numbers[i] for i in by_slot] == list(p.operands)
    # fresh operands: not those of the training problems with the same index and phrasing
    first = composed[0]
    assert first.operands != problems.problem("train", 0, templates=(first.template,)).operands


def test_heldout_clauses_never_occur_in_composed_phrasings() -> None:
    composed = [t.question.lower() for t in composed_templates(3000)]
    for template in TEMPLATES["heldout"]:
        for clause in re.split(r"[.;?,:]", template.question.lower()):
            if len(clause.split()) > 4:
                assert not any(clause.strip() in q for q in composed), clause


def test_compose_rejects_unknown_patterns_and_counts() -> None:
    with pytest.raises(ValueError, match="pattern"):
        compose(len(PATTERNS), random.Random(0))
    with pytest.raises(ValueError, match="count"):
        composed_templates(-1)


def test_composed_phrasings_include_second_holders_and_amounts_after_the_verb() -> None:
    from pimoe.compute.word_lexicon import MORE, OTHER

    questions = [t.question for t in composed_templates(800)]
    apart = [q for q in questions if any(f" {m} {{" in q for m in MORE)]
    assert len(apart) >= 40
    assert sum(any(o in q for o in OTHER) for q in questions) >= 40
    assert sum("in each of the {a}" in q.lower() for q in questions) >= 10
