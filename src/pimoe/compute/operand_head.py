"""Learned text-to-computation for the real-LLM chain: question hidden states -> engine expression.

Two heads read the frozen LM's features of the question (see
:class:`~pimoe.compute.llm_runner.LMRunner`):

- the *pattern* head classifies the operator tree among :data:`PATTERNS` from the summary of the
  question (features of its last position and their mean over the question);
- the *pointer* head scores, for every number written in the question (features of the number's
  last token and of the few tokens after it, next to the summary), its *role*: which slot
  (``a b c d``) of which pattern it fills, or none. Roles are pattern-specific (slot ``b`` of
  ``{a}-{b}+{c}`` is "taken away", of ``{a}*{b}+{c}`` "per box"), so the words around each number
  also vote for the operator tree; on held-out phrasings this beat pattern-free slots.

:meth:`OperandHead.expression` picks the pattern and the assignment of numbers to its slots with
the highest joint score (pattern log-probability plus each number's role log-probability); the operands are copied from the question text digit for digit, so the
engine computes exactly whatever their length. The LM never writes the expression.

Numbers are runs of ASCII digits. A question with fewer numbers than the chosen pattern needs
(no numbers at all, or numbers written with non-ASCII digits) maps to an empty expression, which
the engine reports as ``<err:malformed>``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from pimoe.compute.word_problems import PATTERNS, SLOTS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NONE_SLOT = len(SLOTS)  # slot label "not an operand"
NONE_ROLE = len(PATTERNS) * len(SLOTS)  # pointer class "not an operand"
MAX_NUMBERS = 10  # numbers after the tenth in a question are never operands
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class QuestionNumbers:
    """A question block's token ids and its numbers: ``texts[i]`` ends at token ``positions[i]``."""

    ids: list[int]
    texts: list[str]
    positions: list[int]


def locate_numbers(tokenizer: PreTrainedTokenizerBase, block: str) -> QuestionNumbers:
    """Tokenize ``block`` and find the last token of each ASCII digit run (at most ``MAX_NUMBERS``)."""
    enc = tokenizer(block, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    texts, positions = [], []
    for match in list(_DIGITS.finditer(block))[:MAX_NUMBERS]:
        last_char = match.end() - 1
        token = next((i for i, (s, e) in enumerate(offsets) if s <= last_char < e), None)
        if token is not None:
            texts.append(match.group())
            positions.append(token)
    return QuestionNumbers(ids, texts, positions)


def summary(features: Tensor) -> Tensor:
    """``features [T, F]`` of a question block -> ``[2F]``: last position and mean."""
    return torch.cat([features[-1], features.mean(0)])


def number_features(features: Tensor, positions: list[int], window: int = 3) -> Tensor:
    """``features [T, F]`` -> ``[N, 2F]``: each number's last token, next to the mean of the up to
    ``window`` tokens after it (they have read the number and the words that follow it)."""
    rows = []
    for p in positions:
        after = features[p + 1 : p + 1 + window]
        rows.append(
            torch.cat([features[p], (after if len(after) else features[p : p + 1]).mean(0)])
        )
    return torch.stack(rows) if rows else features.new_zeros(0, 2 * features.shape[-1])


def role(pattern: int, slots: Tensor) -> Tensor:
    """Pointer classes of ``slots [N]`` (slot indices, ``NONE_SLOT`` for none) of ``pattern``."""
    return torch.where(
        slots == NONE_SLOT, torch.full_like(slots, NONE_ROLE), pattern * len(SLOTS) + slots
    )


class OperandHead(nn.Module):
    """Pattern classifier and operand pointer (see the module docstring)."""

    mean: Tensor
    std: Tensor

    def __init__(
        self, feature_dim: int, hidden: int = 128, num_patterns: int = len(PATTERNS)
    ) -> None:
        super().__init__()
        if feature_dim < 1 or hidden < 1:
            raise ValueError(
                f"feature_dim and hidden must be positive, got {feature_dim}, {hidden}"
            )
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        self.pattern = nn.Sequential(
            nn.Linear(2 * feature_dim, hidden), nn.GELU(), nn.Linear(hidden, num_patterns)
        )
        self.pointer = nn.Sequential(
            nn.Linear(4 * feature_dim, hidden), nn.GELU(), nn.Linear(hidden, NONE_ROLE + 1)
        )

    def set_scale(self, features: Tensor) -> None:
        """Standardize inputs with the statistics of ``features [N, feature_dim]``."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-4))

    def forward(self, summaries: Tensor, numbers: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """``summaries [B, 2F]`` (:func:`summary` of each question block's features), ``numbers
        [N, 2F]`` (:func:`number_features`), ``owner [N]`` (the question of each number)
        -> ``(pattern logits [B, P], role logits [N, P*len(SLOTS)+1])`` (:func:`role`)."""
        return self.logits(*self.inputs(summaries, numbers, owner))

    def inputs(self, summaries: Tensor, numbers: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """The standardized inputs of the pattern and pointer MLPs: ``[B, 2F]``, ``[N, 4F]``
        (:meth:`forward` is ``logits(*inputs(...))``; training computes them once)."""
        mean, std = self.mean.repeat(2), self.std.repeat(2)
        s, n = (summaries - mean) / std, (numbers - mean) / std
        return s, torch.cat([n, s[owner]], dim=-1)

    def logits(self, pattern_in: Tensor, pointer_in: Tensor) -> tuple[Tensor, Tensor]:
        """Pattern and role logits of :meth:`inputs`' two outputs."""
        return self.pattern(pattern_in), self.pointer(pointer_in)

    @torch.no_grad()
    def log_probs(self, question: Tensor, numbers: QuestionNumbers) -> tuple[Tensor, Tensor]:
        """Question block features ``[T, F]`` -> ``(pattern log-probs [P], role log-probs [N, R])``."""
        owner = torch.zeros(len(numbers.positions), dtype=torch.long)
        pattern_logits, slot_logits = self(
            summary(question)[None], number_features(question, numbers.positions), owner
        )
        return pattern_logits[0].log_softmax(-1), slot_logits.log_softmax(-1)

    def expression(self, question: Tensor, numbers: QuestionNumbers) -> str:
        """The most likely engine expression for a question block (``""`` when unmappable)."""
        return decode(*self.log_probs(question, numbers), numbers.texts)


class HeadEnsemble(nn.Module):
    """Several :class:`OperandHead` (trained with different seeds) voting with their mean log-probs."""

    def __init__(self, heads: list[OperandHead]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("an ensemble needs at least one head")
        self.heads = nn.ModuleList(heads)

    def log_probs(self, question: Tensor, numbers: QuestionNumbers) -> tuple[Tensor, Tensor]:
        """Mean over the heads of :meth:`OperandHead.log_probs`."""
        parts = [cast(OperandHead, head).log_probs(question, numbers) for head in self.heads]
        return tuple(torch.stack(p).mean(0) for p in zip(*parts))  # type: ignore[return-value]

    def expression(self, question: Tensor, numbers: QuestionNumbers) -> str:
        """As :meth:`OperandHead.expression`, on the mean log-probs."""
        return decode(*self.log_probs(question, numbers), numbers.texts)


@dataclass(frozen=True)
class Candidate:
    """One reading of a question: ``PATTERNS[pattern]`` with ``operands`` (number texts, in slot
    order ``a b c d``) and the head's joint ``score``."""

    score: float
    pattern: int
    operands: tuple[str, ...]

    def fill(self, template: str) -> str:
        """``template`` (over the slots, e.g. ``PATTERNS[pattern]``) with the operands filled in."""
        return template.format(**dict(zip(SLOTS, self.operands)))

    @property
    def expression(self) -> str:
        return self.fill(PATTERNS[self.pattern])


def candidates(
    pattern_lp: Tensor, slot_lp: Tensor, texts: list[str], top: int | None = None
) -> list[Candidate]:
    """Every pattern and assignment of ``texts`` (the question's numbers) to its slots, best first
    (the ``top`` best when given). The joint score is ``pattern_lp [P]`` plus each number's role
    log-prob in ``slot_lp [N, R]`` (``NONE_ROLE`` for numbers left out); patterns needing more
    numbers than the question has are skipped."""
    out = []
    for p, template in enumerate(PATTERNS):
        arity = sum(f"{{{s}}}" in template for s in SLOTS)
        roles = role(p, torch.arange(arity))
        for chosen in itertools.permutations(range(len(texts)), arity):
            unused = [i for i in range(len(texts)) if i not in chosen]
            score = float(
                pattern_lp[p]
                + sum(slot_lp[i, roles[s]] for s, i in enumerate(chosen))
                + sum(slot_lp[i, NONE_ROLE] for i in unused)
            )
            out.append(Candidate(score, p, tuple(texts[i] for i in chosen)))
    out.sort(key=lambda c: -c.score)
    return out[:top] if top is not None else out


def decode(pattern_lp: Tensor, slot_lp: Tensor, texts: list[str]) -> str:
    """The expression of the best of :func:`candidates` (``""`` when no pattern fits the numbers)."""
    best = candidates(pattern_lp, slot_lp, texts, 1)
    return best[0].expression if best else ""
