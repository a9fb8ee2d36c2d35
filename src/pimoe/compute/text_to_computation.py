"""Text-to-computation: turn the bytes of a routed span into an expression for the engine.

This module is **rule-based, not learned**: it lower-cases the span, rewrites a fixed list of
operator words (``plus``, ``minus``, ``times``, ``multiplied by``, ``divided by``, ``over``, ``x``
between numbers) into ``+ - * /``, drops thousands separators (``48,213``) and spaces, and passes
the result on. A reference ``#k`` (k = 1, 2, ...) stands for the k-th integer written in the
``context`` (the text before the span): the text side can call the computation on the question's
numbers without copying their digits. Anything it cannot rewrite is passed through unchanged, so the engine reports it
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
_REFERENCE = re.compile(r"#(\d+)")


def _text(data: bytes | str) -> str:
    return (
        data.decode("ascii", errors="replace").replace("\ufffd", "?")
        if isinstance(data, bytes)
        else data
    )


def to_expression(span: bytes | str, context: bytes | str = "") -> str:
    """Rewrite the text of a computation span into the engine's expression syntax.

    Examples: ``b"48213*907+12"`` -> ``"48213*907+12"``; ``"48,213 times 907 plus 12"`` ->
    ``"48213*907+12"``; ``"#1*#2+#3"`` with context ``"... 48213 bolts ... 907 crates plus 12"``
    -> ``"48213*907+12"``. A reference past the context's numbers is left as is, and non-ASCII
    bytes become ``"?"``: the engine then reports ``malformed``.
    """
    numbers = re.findall(r"\d+", _THOUSANDS.sub("", _text(context)))
    text = _REFERENCE.sub(
        lambda m: (
            numbers[int(m.group(1)) - 1] if 1 <= int(m.group(1)) <= len(numbers) else m.group(0)
        ),
        _text(span),
    )
    text = text.lower()
    for pattern, op in _WORD_OPS:
        text = pattern.sub(op, text)
    text = _THOUSANDS.sub("", text)
    return re.sub(r"\s+", "", text)
