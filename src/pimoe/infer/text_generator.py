"""What the OpenAI routes serve: a :class:`TextGenerator` (an engine with ``submit``, ``queued``
and ``close``) that sends each request's :class:`GenerationEvent` s to a callback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pimoe.infer.decode_batch import TextModel
from pimoe.infer.sampling import SamplingParams

FinishReason = str  # "stop" | "length"


@dataclass(frozen=True)
class GenerationEvent:
    """New ``text`` of one sequence since its previous event. The last event has a
    ``finish_reason`` ("stop" or "length") and the completion's ``token_ids``, or an ``error``
    (``status``, message); ``completion_tokens`` counts the tokens generated so far."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    token_ids: tuple[int, ...] = ()
    error: tuple[int, str] | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Cancellable(Protocol):
    def cancel(self) -> None:
        """Make the request leave as soon as it can."""


class TextGenerator(Protocol):
    """What the OpenAI routes serve: a :class:`GenerationEngine`, or another engine with the same
    surface (:class:`~pimoe.infer.chain_serving.ChainEngine`). ``kind`` is what ``/healthz``
    reports; ``greedy_only`` engines refuse sampling parameters."""

    kind: str
    greedy_only: bool

    @property
    def model(self) -> TextModel: ...

    @property
    def queued(self) -> int: ...

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_event: Callable[[GenerationEvent], None],
        timeout_s: float | None = None,
    ) -> Cancellable: ...

    def close(self) -> None: ...


__all__ = ["Cancellable", "FinishReason", "GenerationEvent", "TextGenerator"]
