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
from typing import Literal

from pimoe.compute.engine import ArithmeticEngine

Split = Literal["train", "heldout"]
SLOTS = "abcd"

# Expression patterns over operand slots; the text-to-computation module classifies among these.
PATTERNS: tuple[str, ...] = (
    "{a}-{b}+{c}",
    "{a}*{b}+{c}",
    "{a}*{b}-{c}",
    "({a}+{b})*{c}",
    "({a}-{b})/{c}",
    "{a}*{b}*{c}",
    "{a}+{b}+{c}-{d}",
    "({a}+{b})/{c}",
)

# How the two-call agent's first call words a request for each pattern.
REQUESTS: dict[str, str] = {
    "{a}-{b}+{c}": "start with {a}, take away {b}, then add {c}",
    "{a}*{b}+{c}": "multiply {a} by {b}, then add {c}",
    "{a}*{b}-{c}": "multiply {a} by {b}, then subtract {c}",
    "({a}+{b})*{c}": "add {a} and {b}, then multiply by {c}",
    "({a}-{b})/{c}": "subtract {b} from {a}, then divide by {c}",
    "{a}*{b}*{c}": "multiply {a}, {b} and {c}",
    "{a}+{b}+{c}-{d}": "add {a}, {b} and {c}, then subtract {d}",
    "({a}+{b})/{c}": "add {a} and {b}, then divide by {c}",
}


@dataclass(frozen=True)
class Template:
    """A phrasing of one pattern: ``question`` over the slots and ``{item}``, ``answer`` over ``{r}``."""

    pattern: str
    question: str
    answer: str


_T = Template
TEMPLATES: dict[Split, tuple[Template, ...]] = {
    "train": (
        _T(PATTERNS[0], "A shop had {a} {item}. It sold {b} and then received {c} more. How many {item} does it have now?",
           "The shop has {r} {item} now."),
        _T(PATTERNS[0], "Tom collected {a} {item}, lost {b} of them and found {c} more. How many {item} does Tom have?",
           "Tom has {r} {item}."),
        _T(PATTERNS[0], "Having sold {b} of them and then added {c}, how many {item} are in a box that first had {a}?",
           "The box has {r} {item}."),
        _T(PATTERNS[1], "There are {a} boxes with {b} {item} in each box, and {c} loose {item}. How many {item} are there?",
           "There are {r} {item} in all."),
        _T(PATTERNS[1], "Each of {a} shelves holds {b} {item}. The store also keeps {c} {item} in the back. How many {item} does the store have?",
           "The store has {r} {item}."),
        _T(PATTERNS[1], "Besides {c} single {item}, a crate contains {a} trays of {b} {item}. How many {item} in total?",
           "In total there are {r} {item}."),
        _T(PATTERNS[2], "A factory made {a} crates of {b} {item} each, then {c} {item} were broken. How many good {item} are left?",
           "There are {r} good {item} left."),
        _T(PATTERNS[2], "Anna bought {a} packs with {b} {item} per pack and gave away {c} {item}. How many {item} does she keep?",
           "Anna keeps {r} {item}."),
        _T(PATTERNS[2], "After {c} {item} are thrown out, how many are left from {a} bins of {b} {item} each?",
           "There are {r} {item} left."),
        _T(PATTERNS[3], "Sam has {a} {item} and Mia has {b} {item}. Each {item} costs {c} dollars. How much are all their {item} worth?",
           "All their {item} are worth {r} dollars."),
        _T(PATTERNS[3], "A van carries {a} red and {b} blue boxes. Every box weighs {c} grams. What is the total weight?",
           "The total weight is {r} grams."),
        _T(PATTERNS[3], "At {c} dollars each, what do {a} plus {b} {item} cost?",
           "They cost {r} dollars."),
        _T(PATTERNS[4], "A club had {a} {item}, used {b} of them and shared the rest equally among {c} members. How many {item} does each member get?",
           "Each member gets {r} {item}."),
        _T(PATTERNS[4], "From {a} {item}, {b} were sold and the rest were packed into {c} equal bags. How many {item} are in each bag?",
           "Each bag holds {r} {item}."),
        _T(PATTERNS[4], "Split among {c} kids, how many {item} does each get from {a} {item} after {b} are lost?",
           "Each kid gets {r} {item}."),
        _T(PATTERNS[5], "A warehouse has {a} rooms, each with {b} racks, and each rack holds {c} {item}. How many {item} are stored?",
           "The warehouse stores {r} {item}."),
        _T(PATTERNS[5], "There are {a} trucks. Each truck carries {b} crates with {c} {item} per crate. How many {item} are carried?",
           "The trucks carry {r} {item}."),
        _T(PATTERNS[5], "Each of {b} shelves in each of {a} shops holds {c} {item}. How many {item} in all?",
           "There are {r} {item} in all."),
        _T(PATTERNS[6], "Lena picked {a} {item} on Monday, {b} on Tuesday and {c} on Wednesday, then sold {d}. How many {item} are left?",
           "Lena has {r} {item} left."),
        _T(PATTERNS[6], "A library received {a}, {b} and {c} {item} in three shipments and lost {d}. How many {item} does it have?",
           "The library has {r} {item}."),
        _T(PATTERNS[6], "{d} {item} broke out of a batch made of {a}, {b} and {c} {item}. How many {item} are fine?",
           "{r} {item} are fine."),
        _T(PATTERNS[7], "Ben has {a} {item} and Eva has {b} {item}. They split all of them equally into {c} groups. How many {item} are in each group?",
           "Each group has {r} {item}."),
        _T(PATTERNS[7], "A farm grew {a} {item} in spring and {b} in autumn and packed them evenly into {c} boxes. How many {item} are in each box?",
           "Each box has {r} {item}."),
        _T(PATTERNS[7], "Into {c} equal piles go {a} old and {b} new {item}. How many {item} per pile?",
           "There are {r} {item} per pile."),
        _T(PATTERNS[0], "A bakery baked {a} {item}, gave {b} to a school and made {c} more. How many {item} does the bakery have?",
           "The bakery has {r} {item}."),
        _T(PATTERNS[0], "{a} {item} were in a jar. Kids took {b} and a teacher put in {c}. How many {item} are in the jar?",
           "The jar holds {r} {item}."),
        _T(PATTERNS[0], "Before the fair there were {a} {item}; {b} were won and {c} were donated. How many {item} remain?",
           "There are still {r} {item}."),
        _T(PATTERNS[1], "A printer prints {b} {item} a minute for {a} minutes, then {c} extra. How many {item} were printed?",
           "It printed {r} {item}."),
        _T(PATTERNS[1], "Zoe stacks {a} piles of {b} {item} and has {c} more on the side. How many {item} does Zoe have?",
           "Zoe has {r} {item}."),
        _T(PATTERNS[1], "How many {item} are there if {a} jars each hold {b} {item} and {c} {item} lie on the table?",
           "There are {r} {item}."),
        _T(PATTERNS[2], "A school ordered {a} cartons of {b} {item}, but {c} {item} arrived damaged. How many usable {item} are there?",
           "There are {r} usable {item}."),
        _T(PATTERNS[2], "Max earns {b} {item} per day for {a} days and spends {c} {item}. How many {item} does he save?",
           "Max saves {r} {item}."),
        _T(PATTERNS[2], "What is left when {c} {item} are taken from {a} rows of {b} {item}?",
           "{r} {item} are left."),
        _T(PATTERNS[3], "Two classes have {a} and {b} students, and each student needs {c} {item}. How many {item} are needed?",
           "They need {r} {item}."),
        _T(PATTERNS[3], "A tour sold {a} adult and {b} child tickets at {c} dollars each. How much money came in?",
           "The tour made {r} dollars."),
        _T(PATTERNS[3], "If {c} {item} go in each bag and there are {a} small and {b} large bags, how many {item} are used?",
           "They use {r} {item}."),
        _T(PATTERNS[4], "A teacher had {a} {item}, kept {b} and handed out the rest evenly to {c} students. How many {item} did each student get?",
           "Each student got {r} {item}."),
        _T(PATTERNS[4], "After removing {b} bad {item} from {a}, the rest are put in {c} equal rows. How many {item} per row?",
           "Each row has {r} {item}."),
        _T(PATTERNS[4], "{a} {item} minus {b} broken ones are shared by {c} teams equally. What does each team get?",
           "Each team gets {r} {item}."),
        _T(PATTERNS[5], "A building has {a} floors with {b} rooms per floor and {c} {item} per room. How many {item} are there?",
           "There are {r} {item}."),
        _T(PATTERNS[5], "What is the total if {a} boxes each hold {b} bags that each hold {c} {item}?",
           "The total is {r} {item}."),
        _T(PATTERNS[5], "{c} {item} sit on each of {b} trays in each of {a} ovens. How many {item} is that?",
           "That is {r} {item}."),
        _T(PATTERNS[6], "Three boats caught {a}, {b} and {c} {item}, and {d} were thrown back. How many {item} were kept?",
           "They kept {r} {item}."),
        _T(PATTERNS[6], "A shop got {a} {item} in May, {b} in June and {c} in July and sold {d}. How many {item} are in stock?",
           "The shop has {r} {item} in stock."),
        _T(PATTERNS[6], "After giving away {d}, how many {item} are left from piles of {a}, {b} and {c}?",
           "{r} {item} are left."),
        _T(PATTERNS[7], "Leo found {a} {item} and Ivy found {b}. They shared them equally among {c} friends. How many {item} did each friend get?",
           "Each friend got {r} {item}."),
        _T(PATTERNS[7], "{a} red and {b} green {item} are packed evenly into {c} crates. How many {item} go in each crate?",
           "Each crate gets {r} {item}."),
        _T(PATTERNS[7], "How many {item} does each of {c} classes get if {a} plus {b} {item} are divided equally?",
           "Each class gets {r} {item}."),
    ),
    "heldout": (
        _T(PATTERNS[0], "After selling {b} {item} and buying {c}, how many {item} does a trader who started with {a} own?",
           "The trader owns {r} {item}."),
        _T(PATTERNS[1], "Add {c} spare {item} to {a} bundles of {b} {item}. What is the count?",
           "The count is {r}."),
        _T(PATTERNS[2], "{a} bags hold {b} {item} apiece; {c} {item} go missing. How many {item} remain?",
           "{r} {item} remain."),
        _T(PATTERNS[3], "The price per {item} is {c} coins. Jo buys {a} and Kim buys {b}. What do they pay together?",
           "Together they pay {r} coins."),
        _T(PATTERNS[4], "{c} friends split what is left of {a} {item} once {b} are eaten. What is each share?",
           "Each share is {r} {item}."),
        _T(PATTERNS[5], "How many {item} fit in {a} halls that have {b} rows of {c} {item} each?",
           "Exactly {r} {item} fit."),
        _T(PATTERNS[6], "Three crews gathered {a}, {b} and {c} {item}; {d} were discarded. What is the final tally?",
           "The final tally is {r}."),
        _T(PATTERNS[7], "Pool {a} {item} with {b} more and deal them out evenly to {c} tables. How many per table?",
           "Every table gets {r} {item}."),
    ),
}
ITEMS: tuple[str, ...] = ("apples", "books", "coins", "stamps", "marbles", "tickets", "pencils", "shells")


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
        order = sorted(range(len(self.operands)), key=lambda s: self.template.question.index("{" + SLOTS[s] + "}"))
        return order

    @property
    def request(self) -> str:
        """The plain-words request a two-call agent's first call writes for this problem."""
        return REQUESTS[PATTERNS[self.pattern]].format(**dict(zip(SLOTS, self.operands)))

    def tool_answer(self) -> str:
        """``answer_text`` with the tool call ``<<expression>>`` written before the result."""
        return self.answer_text[: self.result_start] + f"<<{self.expression}>>" + self.answer_text[self.result_start:]

    def request_answer(self) -> str:
        """``answer_text`` with the two-call agent's request ``<<request>>`` before the result."""
        return self.answer_text[: self.result_start] + f"<<{self.request}>>" + self.answer_text[self.result_start:]


class WordProblemSet:
    """Seeded train / held-out word problems (see the module docstring)."""

    def __init__(self, train_digits: int = 5, heldout_digits: int = 8, seed: int = 0) -> None:
        if not 1 <= train_digits < heldout_digits:
            raise ValueError(f"need 1 <= train_digits < heldout_digits, got {train_digits}, {heldout_digits}")
        self.train_digits, self.heldout_digits, self.seed = train_digits, heldout_digits, seed
        self.engine = ArithmeticEngine(max_digits=40)

    def problem(self, split: Split, index: int) -> WordProblem:
        """Problem ``index`` of ``split``: a pure function of ``(seed, split, index)``."""
        if split not in TEMPLATES:
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        rng = random.Random(f"{self.seed}/{split}/{index}")
        template = rng.choice(TEMPLATES[split])
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
            if result.ok and result.value is not None and result.value.denominator == 1 and result.value > 0:
                break
        names = dict(zip(SLOTS, map(str, fixed)))
        answer = str(result.value.numerator)
        head, tail = template.answer.split("{r}")
        head, tail = head.format(item=item), tail.format(item=item)
        return WordProblem(
            question=template.question.format(item=item, **names), operands=tuple(map(str, fixed)),
            pattern=PATTERNS.index(pattern), expression=expression, answer=answer,
            answer_text=head + answer + tail, result_start=len(head), template=template)

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
