"""How a completion's tokens are chosen: :class:`SamplingParams` (the OpenAI sampling fields) and
:func:`choose_tokens`, which picks the next token of every row of a decode batch at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Longest stop string: after each token the engine looks for the longest end of the text that
#: begins a stop string, which takes time quadratic in the stop string's length.
MAX_STOP_CHARS = 512


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is sampled.

    Args:
        max_tokens: most completion tokens; None: until the model's context is full.
        temperature: 0 is greedy decoding; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities sum to
            ``top_p`` (1 keeps all).
        seed: seeds this request's own ``torch.Generator`` (a 64-bit signed integer; None: a
            random seed).
        stop: at most 4 strings of at most :data:`MAX_STOP_CHARS` characters that end the
            completion (not included in its text).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if len(self.stop) > 4 or any(not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise ValueError(
                f"stop must hold at most 4 non-empty strings of at most {MAX_STOP_CHARS} characters"
            )


def choose_tokens(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """The next token of each row of ``logits [n, V]``: the argmax where ``params[i].temperature``
    is 0, else a draw with ``generators[i]`` at that temperature within the ``top_p`` nucleus.
    Temperature, softmax and nucleus are computed for all sampled rows at once; each row then
    draws from its own generator (so a seed gives the same text whatever else is in the batch)."""
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    rows = logits[sampled].float().cpu()  # [m, V]; the generators live on the CPU
    # The top logit of each row becomes 0 and the temperature is at least float32's smallest
    # normal number: a vanishing temperature (1e-40) gives 0 and -inf, never inf - inf = NaN.
    rows = rows - rows.amax(dim=-1, keepdim=True)
    temperature = torch.tensor([params[i].temperature for i in sampled])[:, None]
    probs = torch.softmax(rows / temperature.clamp_min(torch.finfo(torch.float32).tiny), dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled])[:, None]
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[:, 0] = False  # the first token is always kept (top_p 1e-300 is 0 in float32)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    for j, i in enumerate(sampled):
        tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
    return tokens


__all__ = ["MAX_STOP_CHARS", "SamplingParams", "choose_tokens"]
