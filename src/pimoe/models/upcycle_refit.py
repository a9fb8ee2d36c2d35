"""Closed-form distillation of split experts: refit the down projections for the routed layer.

With its router fixed, a split layer computes ``sum_{e in S(x)} w_out[e] a_e(x)``, linear in the
down projections ``w_out`` given the hidden activations ``a_e(x) = silu(gate_e x) * up_e x``.
Stacking the selected experts' activations of each token into ``phi(x) [F]`` (zeros for experts
not selected), the down projections that best reproduce the dense MLP output ``y(x)`` on ``T``
training tokens solve a ridge regression pulled towards the original weights ``W0``::

    W = argmin ||Phi W^T - Y||^2 + lam ||W - W0||^2 = (Y^T Phi + lam W0) (Phi^T Phi + lam I)^-1

(``Phi [T, F]``, ``Y [T, D]``, ``W [D, F]``), a ``F x F`` solve per layer instead of gradient
descent. ``lam`` is ``ridge`` times the mean diagonal of ``Phi^T Phi``. The dense MLP output is a
fixed point: with ``top_k == E``, ``W0`` already has zero residual and is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.models.progress import track
from pimoe.models.upcycle import moe_layers
from pimoe.moe import PiMoE, StackedExperts


def _features(layer: PiMoE, x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [T, D]`` -> ``(all, routed)``, both ``[T, E * F_e]``: every expert's hidden activations,
    and the same with zeros for the experts the router does not select."""
    gate, up = torch.einsum("td,efd->tef", x, layer.experts.w_in.float()).chunk(
        2, dim=-1
    )  # [T, E, F_e] each
    act = F.silu(gate) * up
    chosen = (
        layer.router.gate(x.to(layer.router.gate.weight)).float().topk(layer.top_k, dim=-1).indices
    )  # [T, k]
    mask = torch.zeros(x.shape[0], layer.num_experts, device=x.device).scatter_(1, chosen, 1.0)
    return act.reshape(x.shape[0], -1), (act * mask.unsqueeze(-1)).reshape(x.shape[0], -1)


@torch.no_grad()
def refit_experts(
    model: nn.Module,
    train_inputs: Sequence[Tensor],
    ridge: float = 1e-2,
    progress: bool = False,
) -> list[float]:
    """Refit the down projections of every split :class:`PiMoE` layer of ``model`` in place for its
    current router and ``top_k`` (see the module docs); ``train_inputs`` are per layer ``[T, D]``
    inputs of the dense MLP. Returns each layer's relative training error
    ``||MoE(x) - MLP(x)|| / ||MLP(x)||`` after the refit."""
    layers = moe_layers(model)
    if not layers or len(train_inputs) != len(layers):
        raise ValueError(
            f"need one input tensor per PiMoE layer ({len(layers)}), got {len(train_inputs)}"
        )
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    errors = []
    for layer, x in zip(track(layers, "refit experts", enabled=progress), train_inputs):
        if layer.config.weight_outputs:
            raise ValueError("refit_experts needs split layers (weight_outputs=False)")
        w_out = cast(StackedExperts, layer.experts).w_out  # [E, D, F_e]
        x = x.to(w_out.device, torch.float32)
        w0 = w_out.float().permute(1, 0, 2).reshape(w_out.shape[1], -1)  # [D, E*F_e]
        every, phi = _features(layer, x)
        target = every @ w0.T  # [T, D], the dense MLP output
        gram = phi.T @ phi  # [F, F]
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(gram.shape[0], device=x.device)
        w = torch.linalg.solve(gram + lam * eye, phi.T @ target + lam * w0.T).T  # [D, F]
        w_out.copy_(w.reshape(w_out.shape[1], layer.num_experts, -1).permute(1, 0, 2))
        errors.append(float((phi @ w.T - target).norm() / target.norm()))
    return errors
