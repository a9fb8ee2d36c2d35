"""``ComputationExpert``: a non-neural expert that writes exact results into a PiMoE chain.

Interface inside a :class:`pimoe.moe.layer.PiMoE` layer (``experts=[..., expert, ...]``):

1. ``expert.set_context(idx)`` before each forward of the model: ``idx [B, S]`` are the byte ids
   of the whole context (with a KV cache: everything decoded so far, not only the new tokens).
2. The layer hands the expert its rows together with their token positions (the expert declares
   ``uses_positions = True``): a position ``p`` is ``b * S + s`` in ``idx`` flattened row-major,
   which is the layer's own token index without a cache; a cached model passes these absolute
   positions to the layer (``PiMoELM`` does). No router hook is needed.
3. ``forward(x [N, D], positions [N]) -> [N, D]``: for each routed position, the next byte of the exact result
   (see :func:`next_result_bytes`) is looked up in the provided embedding table (the LM's tied
   ``tok_emb``) and scaled by ``scale``; positions with nothing to emit get zeros. The output is
   computed under ``no_grad`` from detached weights: no gradient flows into or through the expert.

With a tied LM head, adding ``scale * E[b]`` to the residual stream raises the logit of byte ``b``
at that position, which is how the exact result enters the chain token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.task import CALL_END, CALL_START, EQUALS
from pimoe.compute.text_to_computation import to_expression

NO_OUTPUT = -1


def next_result_bytes(sequence: bytes | list[int], engine: ArithmeticEngine) -> list[int]:
    """For each position ``t`` of ``sequence``, the byte the computation expert emits next.

    Inside a span ``CALL_START expr "=" r_0 ... r_{n-1} CALL_END``: at the ``=`` position and at
    each of the following ``n`` positions the value is the next byte of
    ``engine.compute(to_expression(expr, context)) + CALL_END``, ``context`` being the bytes before
    the span (where references ``#k`` find their numbers); so the span is closed by the expert;
    elsewhere it is ``NO_OUTPUT``. Positions count from ``=``, independent of what bytes were
    actually written after it. An unparseable expression yields the error token's bytes.
    """
    out = [NO_OUTPUT] * len(sequence)
    in_span, after_eq = False, False
    expr: list[int] = []
    result = b""
    emitted = span_start = 0
    for t, byte in enumerate(sequence):
        if byte == CALL_START:
            in_span, after_eq, expr, span_start = True, False, [], t
        elif byte == CALL_END:
            in_span = after_eq = False
        elif in_span and not after_eq:
            if byte == EQUALS:
                after_eq, emitted = True, 0
                context = bytes(sequence[:span_start])
                result = engine.compute(to_expression(bytes(expr), context)).encode(
                    "ascii"
                ) + bytes([CALL_END])
                out[t] = result[0]
            else:
                expr.append(byte)
        elif in_span:
            emitted += 1
            if emitted < len(result):
                out[t] = result[emitted]
    return out


class ComputationExpert(nn.Module):
    """Exact computation expert for a :class:`PiMoE` layer (no parameters, no gradients).

    Args:
        embedding: the LM's token embedding (``[V, D]``); held by reference, not registered as a
            submodule, so the expert adds nothing to ``parameters()`` or ``state_dict()``.
        engine: the arithmetic engine (default ``ArithmeticEngine()``).
        scale: multiplier on the result byte's embedding row.
    """

    uses_positions = True  # the layer passes each routed row's token position

    def __init__(
        self, embedding: nn.Embedding, engine: ArithmeticEngine | None = None, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.__dict__["_embedding"] = embedding
        self.engine = engine or ArithmeticEngine()
        self.scale = scale
        self._targets: Tensor | None = None

    def targets(self, idx: Tensor) -> Tensor:
        """``idx [B, S]`` byte ids -> ``[B, S]`` long: the result byte to emit, or ``NO_OUTPUT``.

        The positions that are not ``NO_OUTPUT`` are the computation tokens: where a router
        should hand control to this expert (labels for training it).
        """
        rows = [next_result_bytes(row, self.engine) for row in idx.tolist()]
        return torch.tensor(rows, dtype=torch.long, device=idx.device).reshape(idx.shape)

    def set_context(self, idx: Tensor) -> None:
        """Set the byte ids ``[B, S]`` of the whole context the next forward pass belongs to."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, S], got {tuple(idx.shape)}")
        self._targets = self.targets(idx).reshape(-1)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """``x [N, D]`` rows routed here, ``positions [N]`` -> ``[N, D]`` scaled embeddings of
        the result bytes (zeros where there is nothing to emit)."""
        if self._targets is None:
            raise RuntimeError("no context: call set_context(idx) before the forward pass")
        if positions.shape != x.shape[:1]:
            raise ValueError(f"expected {x.shape[0]} positions, got shape {tuple(positions.shape)}")
        with torch.no_grad():
            if (
                positions.numel()
                and not 0 <= int(positions.min()) <= int(positions.max()) < self._targets.numel()
            ):
                raise ValueError("positions fall outside the context given to set_context(idx)")
            byte = self._targets.to(positions.device)[positions]  # [N]
            weight = self._embedding.weight.detach()  # type: ignore[union-attr,operator]  # [V, D]
            out = weight[byte.clamp(min=0)] * self.scale  # [N, D]
            out = out * (byte != NO_OUTPUT).unsqueeze(-1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, max_digits={self.engine.max_digits}"
