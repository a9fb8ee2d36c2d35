"""What one step of the generation engine runs: its token budget and chunked prefill, as in vLLM's
scheduler (``max_num_batched_tokens``, ``enable_chunked_prefill``).

A step processes one token of every running sequence (its decode) plus prompt tokens of
sequences being admitted. With a budget of ``max_num_batched_tokens`` tokens a step, the running
sequences' tokens are counted first; a prompt being prefilled in chunks continues with as many
tokens as are left; then waiting prompts are admitted whole, in arrival order, while they fit.

- Without chunked prefill, a prompt that does not fit waits for the next step, except that a step
  always admits at least one prompt (a long prompt is then prefilled whole, alone, and every
  running stream waits for that prefill).
- With chunked prefill, the first prompt that does not fit starts a chunked prefill with the
  tokens left in the budget, and continues in the next steps (one prompt is chunked at a time,
  as vLLM's ``max_num_partial_prefills=1``); its keys and values are carried from chunk to chunk.
  So a step never runs more than ``max_num_batched_tokens`` tokens, and the running streams get
  a token every step while a long prompt is prefilled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """The per-step token budget.

    Args:
        max_num_batched_tokens: most tokens one step processes: one per running sequence plus
            prompt tokens. None: no limit (every waiting prompt that has a free row is admitted).
        enable_chunked_prefill: split a prompt that does not fit the budget into chunks over the
            next steps instead of prefilling it whole (needs a ``max_num_batched_tokens``).
    """

    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = False

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1 or None, got {self.max_num_batched_tokens}"
            )
        if self.enable_chunked_prefill and self.max_num_batched_tokens is None:
            raise ValueError("enable_chunked_prefill needs a max_num_batched_tokens")


@dataclass(frozen=True)
class StepPlan:
    """One step's prompt work: ``chunk`` tokens of the prompt prefilled in chunks (the one
    already started, or, with ``start_chunked``, the waiting request after the ``whole`` ones),
    and ``whole`` waiting requests admitted with their whole prompt."""

    chunk: int = 0
    whole: int = 0
    start_chunked: bool = False


def plan_step(
    config: SchedulerConfig,
    running: int,
    free_rows: int,
    chunk_left: int | None,
    waiting: Sequence[int],
) -> StepPlan:
    """Plan one step.

    Args:
        config: the budget.
        running: sequences decoding this step (one token each).
        free_rows: rows of the decode batch not taken by running sequences nor by the prompt
            being prefilled in chunks.
        chunk_left: prompt tokens not yet prefilled of the prompt being prefilled in chunks
            (None: there is none).
        waiting: prompt lengths of the waiting requests, in arrival order (the first
            ``free_rows + 1`` suffice).
    """
    limit = config.max_num_batched_tokens
    budget = None if limit is None else limit - running
    chunk = 0
    if chunk_left is not None:
        chunk = chunk_left if budget is None else max(0, min(chunk_left, budget))
        budget = None if budget is None else budget - chunk
    whole = 0
    for length in waiting:
        if whole >= free_rows:
            break
        if budget is None or length <= budget:
            whole += 1
            budget = None if budget is None else budget - length
            continue
        if not config.enable_chunked_prefill:
            whole = max(whole, 1)  # at least one prompt a step, whole
        elif chunk_left is None and budget > 0:
            return StepPlan(budget, whole, True)
        break
    return StepPlan(chunk, whole, False)


__all__ = ["SchedulerConfig", "StepPlan", "plan_step"]
