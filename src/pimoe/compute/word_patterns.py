"""The word problems' operator trees (:data:`PATTERNS`), their slots, the plain-words request of
each tree (:data:`REQUESTS`) and the :class:`Template` of a phrasing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
