"""Exact arithmetic engine: a recursive-descent parser and evaluator over Python ``Fraction``.

Grammar (whitespace between tokens is ignored)::

    expr    := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := "-" unary | primary
    primary := NUMBER | "(" expr ")"
    NUMBER  := digit+            (non-negative integer literal)

Semantics: every value is an exact rational (``fractions.Fraction``); ``/`` is exact rational
division. A result is rendered as an integer (``"-42"``) when its denominator is 1, otherwise as
the reduced fraction ``"p/q"`` (``"7/2"``): no rounding ever happens.

Limits (all errors are values, never exceptions): an operand with more than ``max_digits``
digits, or an intermediate or final value whose numerator or denominator has more than
``max_digits`` digits, is ``"overflow"``; input longer than ``max_len`` characters or nested
deeper than ``max_depth`` is ``"too_long"``; division by zero is ``"div0"``; anything outside the
grammar (including non-ASCII bytes) is ``"malformed"``. Nothing is passed to ``eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

ErrorKind = Literal["div0", "overflow", "malformed", "too_long"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("div0", "overflow", "malformed", "too_long")


@dataclass(frozen=True)
class ComputeResult:
    """Outcome of one evaluation: ``value`` when ``ok``, else ``error`` (one of ``ERROR_KINDS``)."""

    ok: bool
    value: Fraction | None = None
    error: ErrorKind | None = None

    def render(self) -> str:
        """``"123"``, ``"-7/2"``, or the error token ``"<err:KIND>"``."""
        if not self.ok or self.value is None:
            return f"<err:{self.error}>"
        if self.value.denominator == 1:
            return str(self.value.numerator)
        return f"{self.value.numerator}/{self.value.denominator}"


class _EngineError(Exception):
    """Internal control flow only: caught in :meth:`ArithmeticEngine.evaluate`."""

    def __init__(self, kind: ErrorKind) -> None:
        super().__init__(kind)
        self.kind: ErrorKind = kind


class _Parser:
    """Parses and evaluates one expression string; see the module docstring for the grammar."""

    def __init__(self, text: str, max_digits: int, max_depth: int) -> None:
        self.text, self.pos = text, 0
        self.max_digits, self.max_depth = max_digits, max_depth
        self.depth = 0

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def _peek(self) -> str:
        self._skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _check(self, value: Fraction) -> Fraction:
        limit = 10**self.max_digits
        if abs(value.numerator) >= limit or value.denominator >= limit:
            raise _EngineError("overflow")
        return value

    def parse(self) -> Fraction:
        value = self._expr()
        if self._peek() != "":
            raise _EngineError("malformed")
        return value

    def _expr(self) -> Fraction:
        value = self._term()
        while (op := self._peek()) in ("+", "-"):
            self.pos += 1
            rhs = self._term()
            value = self._check(value + rhs if op == "+" else value - rhs)
        return value

    def _term(self) -> Fraction:
        value = self._unary()
        while (op := self._peek()) in ("*", "/"):
            self.pos += 1
            rhs = self._unary()
            if op == "*":
                value = self._check(value * rhs)
            elif rhs == 0:
                raise _EngineError("div0")
            else:
                value = self._check(value / rhs)
        return value

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise _EngineError("too_long")

    def _unary(self) -> Fraction:
        if self._peek() == "-":
            self.pos += 1
            self._enter()
            value = -self._unary()
            self.depth -= 1
            return value
        return self._primary()

    def _primary(self) -> Fraction:
        char = self._peek()
        if char == "(":
            self.pos += 1
            self._enter()
            value = self._expr()
            if self._peek() != ")":
                raise _EngineError("malformed")
            self.pos += 1
            self.depth -= 1
            return value
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789":
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits:
            raise _EngineError("malformed")
        if len(digits.lstrip("0")) > self.max_digits:
            raise _EngineError("overflow")
        return Fraction(int(digits))


class ArithmeticEngine:
    """Exact evaluator of ``+ - * /`` expressions with parentheses and unary minus.

    Args:
        max_digits: largest number of decimal digits of an operand, and of the numerator and
            denominator of every intermediate and final value.
        max_len: longest accepted input, in characters.
        max_depth: deepest nesting of parentheses and unary minus.
    """

    def __init__(self, max_digits: int = 40, max_len: int = 256, max_depth: int = 64) -> None:
        if max_digits < 1 or max_len < 1 or max_depth < 1:
            raise ValueError("max_digits, max_len and max_depth must be >= 1")
        self.max_digits, self.max_len, self.max_depth = max_digits, max_len, max_depth

    def evaluate(self, expression: str | bytes) -> ComputeResult:
        """Parse and evaluate ``expression``; never raises, errors come back as a result."""
        if isinstance(expression, bytes):
            try:
                expression = expression.decode("ascii")
            except UnicodeDecodeError:
                return ComputeResult(ok=False, error="malformed")
        if len(expression) > self.max_len:
            return ComputeResult(ok=False, error="too_long")
        try:
            value = _Parser(expression, self.max_digits, self.max_depth).parse()
        except _EngineError as err:
            return ComputeResult(ok=False, error=err.kind)
        return ComputeResult(ok=True, value=value)

    def compute(self, expression: str | bytes) -> str:
        """``evaluate(expression).render()``: the result text or the error token."""
        return self.evaluate(expression).render()
