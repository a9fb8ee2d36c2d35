"""The reasoning + computation task: seeded arithmetic problems with multi-digit operands.

Each problem is a short prompt (an expression or a templated word problem) followed by a
completion in which the model writes a *computation span*::

    prompt:      "Q: A crate holds 48213 bolts. How many bolts are in 907 crates plus 12 more?\\nA: "
    completion:  CALL_START "48213*907+12=" "43729203" CALL_END "\\n"

Byte-level convention (compatible with ``PiMoELM``'s vocabulary of 256): the span starts with
the control byte ``CALL_START`` (0x02, ASCII STX) and ends with ``CALL_END`` (0x03, ASCII ETX);
inside it, the expression, the byte ``=``, then the result bytes. The expression is the
text-to-computation part (written by the text side), the bytes after ``=`` up to and including
``CALL_END`` are the computation part (exact; produced by the computation expert at inference).
:func:`pretty` renders the markers as ``<<`` and ``>>`` (the GSM8K tool-use style).

Splits: ``"train"`` draws operands of 1..``train_digits`` digits; ``"heldout"`` draws at least one
operand of ``train_digits + 1``..``heldout_digits`` digits (longer than anything in training).
Problems are a pure function of ``(split, index, seed)``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

import torch

from pimoe.compute.engine import ArithmeticEngine

CALL_START = 0x02
CALL_END = 0x03
EQUALS = ord("=")
Split = Literal["train", "heldout"]
Calls = Literal["expression", "reference"]

_WORD_TEMPLATES: tuple[tuple[str, str], ...] = (
    # (template over operands a, b, c; expression over the same operands)
    ("A crate holds {a} bolts. How many bolts are in {b} crates plus {c} more?", "{a}*{b}+{c}"),
    ("A farm had {a} sheep, sold {b} and bought {c}. How many sheep now?", "{a}-{b}+{c}"),
    ("Each of {a} boxes has {b} pens. {c} pens are lost. How many pens remain?", "{a}*{b}-{c}"),
    (
        "A tank has {a} litres; {b} litres are added, then {c} litres are added. Total?",
        "{a}+{b}+{c}",
    ),
)


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` and ``completion`` are text; ``expression`` is what the span
    computes, ``answer`` its exact rendered value, and ``call`` what the text side writes in the
    span before ``=`` (the expression itself, or with ``#k`` references to the prompt's numbers)."""

    prompt: str
    expression: str
    answer: str
    call: str

    @property
    def completion(self) -> str:
        """The target continuation: the computation span followed by a newline."""
        return f"{chr(CALL_START)}{self.call}={self.answer}{chr(CALL_END)}\n"

    @property
    def text(self) -> str:
        """``prompt + completion``: one training sequence."""
        return self.prompt + self.completion

    def encode(self) -> bytes:
        """The byte-level sequence (token ids are the byte values, vocab 256)."""
        return self.text.encode("ascii")


def pretty(text: str | bytes) -> str:
    """Human-readable form: ``CALL_START``/``CALL_END`` shown as ``<<``/``>>``."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    return text.replace(chr(CALL_START), "<<").replace(chr(CALL_END), ">>")


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(1, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


class ArithmeticTask:
    """Seeded generator of the train and held-out splits.

    Args:
        train_digits: largest operand length (decimal digits) in the train split.
        heldout_digits: largest operand length in the held-out split (> ``train_digits``).
        word_fraction: probability that a problem is a templated word problem rather than
            ``"Compute <expression>."``.
        seed: base seed; each problem is generated from ``(seed, split, index)`` alone.
        calls: ``"expression"``: the span holds the expression with its operands' digits
            (``48213*907+12``); ``"reference"``: the operands are written as references to the
            prompt's numbers in order of appearance (``#1*#2+#3``), resolved by
            :func:`to_expression`, so writing the call never means copying digits.
    """

    def __init__(
        self,
        train_digits: int = 4,
        heldout_digits: int = 8,
        word_fraction: float = 0.5,
        seed: int = 0,
        calls: Calls = "expression",
    ) -> None:
        if not 1 <= train_digits < heldout_digits:
            raise ValueError(
                f"need 1 <= train_digits < heldout_digits, got {train_digits}, {heldout_digits}"
            )
        if not 0.0 <= word_fraction <= 1.0:
            raise ValueError(f"word_fraction must be in [0, 1], got {word_fraction}")
        self.train_digits, self.heldout_digits = train_digits, heldout_digits
        if calls not in ("expression", "reference"):
            raise ValueError(f"calls must be 'expression' or 'reference', got {calls!r}")
        self.word_fraction, self.seed, self.calls = word_fraction, seed, calls
        self.engine = ArithmeticEngine(max_digits=3 * heldout_digits + 2)

    def _digits(self, rng: random.Random, split: Split) -> tuple[int, int, int]:
        low = [rng.randint(1, self.train_digits) for _ in range(3)]
        if split == "train":
            return low[0], low[1], low[2]
        long_slot = rng.randrange(3)
        low[long_slot] = rng.randint(self.train_digits + 1, self.heldout_digits)
        return low[0], low[1], low[2]

    def problem(self, split: Split, index: int) -> Problem:
        """The ``index``-th problem of ``split`` (deterministic)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        rng = random.Random(f"{self.seed}:{split}:{index}")
        a, b, c = (_operand(rng, d) for d in self._digits(rng, split))
        if rng.random() < self.word_fraction:
            template, expr_template = rng.choice(_WORD_TEMPLATES)
            if "-" in expr_template:  # largest first: counts in a story never go negative
                a, b, c = sorted((a, b, c), reverse=True)
            prompt = template.format(a=a, b=b, c=c)
            expression = expr_template.format(a=a, b=b, c=c)
        else:
            ops = [rng.choice("+-*") for _ in range(2)]
            expression = f"{a}{ops[0]}{b}{ops[1]}{c}"
            prompt = f"Compute {a} {ops[0]} {b} {ops[1]} {c}."
        answer = self.engine.compute(expression)
        call = expression
        if self.calls == "reference":  # operands appear in the prompt in the expression's order
            count = iter(range(1, 4))
            call = re.sub(r"\d+", lambda m: f"#{next(count)}", expression)
        return Problem(prompt=f"Q: {prompt}\nA: ", expression=expression, answer=answer, call=call)

    def split(self, split: Split, n: int) -> list[Problem]:
        """The first ``n`` problems of ``split``."""
        return [self.problem(split, i) for i in range(n)]


def encode_batch(sequences: list[bytes], pad: int = 0) -> torch.Tensor:
    """Byte sequences -> ``[B, S]`` long token ids, right-padded with ``pad`` to the longest."""
    length = max((len(s) for s in sequences), default=0)
    rows = [list(s) + [pad] * (length - len(s)) for s in sequences]
    return torch.tensor(rows, dtype=torch.long).reshape(len(sequences), length)


def lm_batch(
    problems: list[Problem], ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-byte training pairs for ``PiMoELM``: ``(idx [B, S], targets [B, S])``.

    ``idx`` is each sequence without its last byte, ``targets`` without its first; padding
    positions of ``targets`` are ``ignore_index`` (the default of ``F.cross_entropy``).
    """
    sequences = [p.encode() for p in problems]
    idx = encode_batch([s[:-1] for s in sequences])
    targets = encode_batch([s[1:] for s in sequences], pad=ignore_index)
    return idx, targets
