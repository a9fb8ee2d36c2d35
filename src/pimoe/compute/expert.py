"""``ComputationExpert``: a non-neural expert that writes exact results into a PiMoE chain.

Interface inside a :class:`pimoe.moe.layer.PiMoE` layer (``experts=[..., expert, ...]``):

1. ``expert.attach(layer, index)`` once: the expert registers a forward hook on ``layer.router``
   and keeps the last :class:`RouterOutput`. From it the expert recomputes the dispatcher's
   ordering (:func:`pimoe.moe.dispatch.sort_assignments`), so it knows *which token positions*
   its ``[N, D]`` rows are: the rows of expert ``index`` are the ``index``-th contiguous slice.
2. ``expert.set_context(idx)`` before each forward of the model: ``idx [B, S]`` are the byte ids
   of the batch (the layer's tokens are ``idx`` flattened row-major, as ``x.reshape(-1, D)`` does).
3. ``forward(x [N, D]) -> [N, D]``: for each routed position, the next byte of the exact result
   (see :func:`next_result_bytes`) is looked up in the provided embedding table (the LM's tied
   ``tok_emb``) and scaled by ``scale``; positions with nothing to emit get zeros. The output is
   computed under ``no_grad`` from detached weights: no gradient flows into or through the expert.

With a tied LM head, adding ``scale * E[b]`` to the residual stream raises the logit of byte ``b``
at that position, which is how the exact result enters the chain token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.task import CALL_END, CALL_START, EQUALS
from pimoe.compute.text_to_computation import to_expression
from pimoe.moe.dispatch import sort_assignments
from pimoe.moe.layer import PiMoE
from pimoe.moe.router import RouterOutput

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
                result = engine.compute(to_expression(bytes(expr), context)).encode("ascii") + bytes([CALL_END])
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

    def __init__(self, embedding: nn.Embedding, engine: ArithmeticEngine | None = None,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.__dict__["_embedding"] = embedding
        self.engine = engine or ArithmeticEngine()
        self.scale = scale
        self.index: int | None = None
        self._layer_experts = 0
        self._route: RouterOutput | None = None
        self._targets: Tensor | None = None
        self._hook: RemovableHandle | None = None

    def attach(self, layer: PiMoE, index: int) -> None:
        """Register on ``layer``, a :class:`PiMoE` whose expert ``index`` is this module."""
        if not 0 <= index < layer.num_experts:
            raise ValueError(f"index must be in [0, {layer.num_experts}), got {index}")
        if self._hook is not None:
            self._hook.remove()
        self.index, self._layer_experts = index, layer.num_experts
        self._hook = layer.router.register_forward_hook(self._keep_route)

    def detach(self) -> None:
        """Remove the router hook registered by :meth:`attach`."""
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._route, self.index = None, None, None

    def _keep_route(self, module: nn.Module, args: tuple, output: RouterOutput) -> None:
        self._route = output

    def targets(self, idx: Tensor) -> Tensor:
        """``idx [B, S]`` byte ids -> ``[B, S]`` long: the result byte to emit, or ``NO_OUTPUT``.

        The positions that are not ``NO_OUTPUT`` are the computation tokens: where a router
        should hand control to this expert (labels for training it).
        """
        rows = [next_result_bytes(row, self.engine) for row in idx.tolist()]
        return torch.tensor(rows, dtype=torch.long, device=idx.device).reshape(idx.shape)

    def set_context(self, idx: Tensor) -> None:
        """Set the byte ids ``[B, S]`` of the batch about to pass through the layer."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, S], got {tuple(idx.shape)}")
        self._targets = self.targets(idx).reshape(-1)

    def routed_positions(self, num_rows: int) -> Tensor:
        """Flat token positions (``b * S + s``) of the ``num_rows`` rows routed to this expert."""
        if self._route is None or self.index is None:
            raise RuntimeError("ComputationExpert is not attached: call attach(layer, index) first")
        token_sorted, _, counts = sort_assignments(self._route, self._layer_experts)
        start = int(counts[: self.index].sum())
        positions = token_sorted[start:start + int(counts[self.index])]
        if positions.numel() != num_rows:
            raise RuntimeError(f"expected {positions.numel()} routed rows, got {num_rows}")
        return positions

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, D]`` rows routed here -> ``[N, D]`` scaled embeddings of the result bytes."""
        if self._targets is None:
            raise RuntimeError("no context: call set_context(idx) before the forward pass")
        with torch.no_grad():
            positions = self.routed_positions(x.shape[0])
            if positions.numel() and int(positions.max()) >= self._targets.numel():
                raise RuntimeError("set_context(idx) does not match the layer's input shape")
            byte = self._targets.to(positions.device)[positions]  # [N]
            weight = self._embedding.weight.detach()  # [V, D]
            out = weight[byte.clamp(min=0)] * self.scale  # [N, D]
            out = out * (byte != NO_OUTPUT).unsqueeze(-1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"index={self.index}, scale={self.scale}, max_digits={self.engine.max_digits}"
