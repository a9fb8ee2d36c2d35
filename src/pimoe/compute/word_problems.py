"""Arithmetic word problems for the real-LLM computation chain.

Every problem is built from a *pattern* (an expression over operand slots ``a b c d``, e.g.
``({a}-{b})/{c}``) and a *template* (how a question and its answer are phrased in English; the
template may mention the operands in any order). Templates are split: ``"train"`` templates are
the only ones seen in training, ``"heldout"`` templates are new phrasings of the same patterns,
with new answer phrasings. Operands: 1..``train_digits`` digits in ``"train"``; in ``"heldout"``
one operand has ``train_digits+1``..``heldout_digits`` digits and the others 1..``heldout_digits``.
Results are exact non-negative integers (division patterns draw divisible operands); problems
are a pure function of ``(seed, split, index)``.

``WordProblem.answer_text`` is the answer the way a model is shown to phrase it; ``result_start``
is the character where the computed quantity begins inside it (the hand-off point).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.word_grammar import generated_templates
from pimoe.compute.word_templates import (
    HELDOUT_SECOND,
    HELDOUT_THIRD,
    PATTERNS,
    REQUESTS,
    SLOTS,
    WRITTEN_TEMPLATES,
    Split,
    Template,
)

# Training phrasings: the hand-written ones and those generated from the grammar's frames.
TEMPLATES: dict[Split, tuple[Template, ...]] = {
    "train": WRITTEN_TEMPLATES["train"] + generated_templates(),
    "heldout": WRITTEN_TEMPLATES["heldout"],
}
__all__ = [
    "HELDOUT_SECOND",
    "HELDOUT_THIRD",
    "ITEMS",
    "PATTERNS",
    "SLOTS",
    "TEMPLATES",
    "Template",
    "WordProblem",
    "WordProblemSet",
]

ITEMS: tuple[str, ...] = (
    "apples",
    "books",
    "coins",
    "stamps",
    "marbles",
    "tickets",
    "pencils",
    "shells",
)


@dataclass(frozen=True)
class WordProblem:
    """One generated problem.

    Attributes:
        question: the question text.
        operands: the operand strings by slot (``operands[0]`` fills ``{a}``).
        pattern: index into :data:`PATTERNS`.
        expression: the engine expression (``"120-45+30"``).
        answer: the exact result as text.
        answer_text: the phrased answer, ``answer`` at ``result_start``.
        result_start: character offset of ``answer`` inside ``answer_text``.
        template: the template it was built from.
    """

    question: str
    operands: tuple[str, ...]
    pattern: int
    expression: str
    answer: str
    answer_text: str
    result_start: int
    template: Template

    @property
    def operand_order(self) -> list[int]:
        """For each number in the question (left to right), its slot index."""
        order = sorted(
            range(len(self.operands)),
            key=lambda s: self.template.question.index("{" + SLOTS[s] + "}"),
        )
        return order

    @property
    def request(self) -> str:
        """The plain-words request a two-call agent's first call writes for this problem."""
        return REQUESTS[PATTERNS[self.pattern]].format(**dict(zip(SLOTS, self.operands)))

    def tool_answer(self) -> str:
        """``answer_text`` with the tool call ``<<expression>>`` written before the result."""
        return (
            self.answer_text[: self.result_start]
            + f"<<{self.expression}>>"
            + self.answer_text[self.result_start :]
        )

    def request_answer(self) -> str:
        """``answer_text`` with the two-call agent's request ``<<request>>`` before the result."""
        return (
            self.answer_text[: self.result_start]
            + f"<<{self.request}>>"
            + self.answer_text[self.result_start :]
        )


class WordProblemSet:
    """Seeded train / held-out word problems (see the module docstring)."""

    def __init__(self, train_digits: int = 5, heldout_digits: int = 8, seed: int = 0) -> None:
        if not 1 <= train_digits < heldout_digits:
            raise ValueError(
                f"need 1 <= train_digits < heldout_digits, got {train_digits}, {heldout_digits}"
            )
        self.train_digits, self.heldout_digits, self.seed = train_digits, heldout_digits, seed
        self.engine = ArithmeticEngine(max_digits=40)

    def problem(
        self,
        split: Split,
        index: int,
        written_only: bool = False,
        templates: tuple[Template, ...] | None = None,
    ) -> WordProblem:
        """Problem ``index`` of ``split``: a pure function of ``(seed, split, index, written_only)``;
        ``written_only`` draws its phrasing from the hand-written ones (the few-shot examples);
        ``templates`` (non-empty) replaces the split's phrasings, keeping its operand lengths."""
        if split not in TEMPLATES:
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if templates is not None and not templates:
            raise ValueError("templates must not be empty")
        rng = random.Random(f"{self.seed}/{split}/{index}")
        pool = templates or (WRITTEN_TEMPLATES if written_only else TEMPLATES)[split]
        template = rng.choice(pool)
        item = rng.choice(ITEMS)
        pattern = template.pattern
        arity = sum(f"{{{s}}}" in pattern for s in SLOTS)
        while True:
            operands = self._draw(rng, split, arity)
            fixed = self._fix(pattern, operands)
            if fixed is None or not self._digits_ok(split, fixed):
                continue
            expression = pattern.format(**dict(zip(SLOTS, map(str, fixed))))
            result = self.engine.evaluate(expression)
            if (
                result.ok
                and result.value is not None
                and result.value.denominator == 1
                and result.value > 0
            ):
                break
        names = dict(zip(SLOTS, map(str, fixed)))
        answer = str(result.value.numerator)
        head, tail = template.answer.split("{r}")
        head, tail = head.format(item=item), tail.format(item=item)
        return WordProblem(
            question=template.question.format(item=item, **names),
            operands=tuple(map(str, fixed)),
            pattern=PATTERNS.index(pattern),
            expression=expression,
            answer=answer,
            answer_text=head + answer + tail,
            result_start=len(head),
            template=template,
        )

    def problems(self, split: Split, start: int, count: int) -> list[WordProblem]:
        """Problems ``start .. start+count-1`` of ``split``."""
        return [self.problem(split, start + i) for i in range(count)]

    def _draw(self, rng: random.Random, split: Split, arity: int) -> list[int]:
        top = self.train_digits if split == "train" else self.heldout_digits
        digits = [rng.randint(1, top) for _ in range(arity)]
        if split == "heldout":
            digits[rng.randrange(arity)] = rng.randint(self.train_digits + 1, self.heldout_digits)
        return [rng.randint(10 ** (d - 1) if d > 1 else 2, 10**d - 1) for d in digits]

    def _fix(self, pattern: str, operands: list[int]) -> list[int] | None:
        """Make a division pattern's numerator a positive multiple of the divisor (by lowering ``a``)."""
        if "/" not in pattern:
            return operands
        a, b, c = operands
        numerator = a - b if pattern.startswith("({a}-") else a + b
        a -= numerator % c
        if numerator < c or a < 1:
            return None
        return [a, b, c]

    def _digits_ok(self, split: Split, operands: list[int]) -> bool:
        lengths = [len(str(x)) for x in operands]
        if split == "train":
            return max(lengths) <= self.train_digits
        return self.train_digits < max(lengths) <= self.heldout_digits
