"""One request inside the generation engine: its prompt, sampling parameters, generated tokens
and the part of its text already sent, and how each new token turns into an event (stop strings,
end-of-sequence tokens, ``max_tokens``, text held back until it is final)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pimoe.infer.decode_batch import TextModel
from pimoe.infer.sampling import SamplingParams
from pimoe.infer.text_generator import FinishReason, GenerationEvent


@dataclass(eq=False)
class GenerationSequence:
    """A request of ``prompt`` token ids; ``limit`` is its most completion tokens (``max_tokens``
    or the room left in the context), ``generator`` its seeded sampler (None when greedy)."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[GenerationEvent], None]
    deadline: float | None
    limit: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the completion text already sent
    done: bool = False
    cancelled: bool = False

    def emit(
        self, text: str, finish: FinishReason | None = None, error: tuple[int, str] | None = None
    ) -> None:
        """Send an event with ``text``; a ``finish`` reason or an ``error`` ends the sequence."""
        if finish is not None or error is not None:
            self.done = True
        event = GenerationEvent(
            text,
            len(self.prompt),
            len(self.tokens),
            finish,
            tuple(self.tokens) if finish is not None else (),
            error,
        )
        try:
            self.on_event(event)
        except Exception:  # a consumer that went away must not stop the engine
            self.cancelled = True

    def advance(self, token: int, model: TextModel) -> None:
        """Append ``token`` and send the new text that is final (all of it at the end)."""
        self.tokens.append(token)
        if token in model.eos_ids:
            self.emit(self._text(model)[self.sent :], "stop")
            return
        text = self._text(model)
        stops = self.params.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self.emit(text[self.sent : max(cut, self.sent)], "stop")
        elif len(self.tokens) >= self.limit:
            self.emit(text[self.sent :], "length")
        else:
            safe = safe_end(text, stops)
            if safe > self.sent:
                out, self.sent = text[self.sent : safe], safe
                self.emit(out)

    def _text(self, model: TextModel) -> str:
        return model.decode([t for t in self.tokens if t not in model.eos_ids])


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent: not a trailing partial character (U+FFFD from an
    incomplete UTF-8 sequence) nor a tail that may grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return (
        end
        - max(
            (
                k
                for s in stops
                for k in range(1, min(len(s), end + 1))  # a tail no longer than the text
                if text.endswith(s[:k], 0, end)
            ),
            default=0,
        )
    )


__all__ = ["GenerationSequence", "safe_end"]
