"""Text-to-computation: turn the bytes of a routed span into an expression for the engine.

This module is **rule-based, not learned**: it lower-cases the span, rewrites a fixed list of
operator words (``plus``, ``minus``, ``times``, ``multiplied by``, ``divided by``, ``over``, ``x``
between numbers) into ``+ - * /``, drops thousands separators (``48,213``) and spaces, and passes
the result on. Anything it cannot rewrite is passed through unchanged, so the engine reports it
as ``"malformed"`` rather than this module guessing. In the paper this module is trained; a
learned replacement would keep the same signature (span bytes -> expression string).
"""

from __future__ import annotations

import re

_WORD_OPS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bmultiplied\s+by\b"), "*"),
    (re.compile(r"\bdivided\s+by\b"), "/"),
    (re.compile(r"\btimes\b"), "*"),
    (re.compile(r"\bplus\b"), "+"),
    (re.compile(r"\bminus\b"), "-"),
    (re.compile(r"\bover\b"), "/"),
    (re.compile(r"(?<=\d)\s*x\s*(?=\d)"), "*"),
)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def to_expression(span: bytes | str) -> str:
    """Rewrite the text of a computation span into the engine's expression syntax.

    Examples: ``b"48213*907+12"`` -> ``"48213*907+12"``; ``"48,213 times 907 plus 12"`` ->
    ``"48213*907+12"``. Non-ASCII bytes are replaced by ``"?"`` (the engine then says malformed).
    """
    text = span.decode("ascii", errors="replace").replace("\ufffd", "?") if isinstance(span, bytes) else span
    text = text.lower()
    for pattern, op in _WORD_OPS:
        text = pattern.sub(op, text)
    text = _THOUSANDS.sub("", text)
    return re.sub(r"\s+", "", text)
