"""Pruning: unstructured magnitude pruning (permanent) and structured FFN-neuron pruning.

Unstructured pruning uses ``torch.nn.utils.prune`` and then ``prune.remove``, so the zeros are
written into the weights and no ``weight_orig``/``weight_mask`` or forward pre-hooks are left.
Zeros in dense tensors do not shrink files or speed up dense matmuls by themselves; structured
pruning (:func:`prune_ffn_neurons`) does, because it builds smaller layers.

Attention heads of ``nn.MultiheadAttention`` are not pruned here: that module ties
``num_heads * head_dim`` to ``embed_dim`` (the input and output width), so removing heads cannot
shrink it without replacing it by a different attention module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune

from pimoe.compress._modules import matches

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)


def _targets(
    model: nn.Module, types: tuple[type[nn.Module], ...], skip: Iterable[str]
) -> list[tuple[str, nn.Module]]:
    skip = tuple(skip)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, types)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and not matches(name, skip)
    ]


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # _targets selects modules with a tensor weight
    return weight.detach()


def magnitude_prune(
    model: nn.Module,
    amount: float,
    *,
    scope: Literal["global", "layer"] = "global",
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Zero the ``amount`` fraction of smallest-magnitude weights, in place and permanently.

    ``scope="global"`` ranks all selected weights together (layers lose different fractions);
    ``"layer"`` removes ``amount`` of each layer. The number of zeroed entries is
    ``round(amount * n)`` of the pooled (global) or per-layer (layer) count ``n``, as in
    ``torch.nn.utils.prune``. Biases are not pruned. Only the ``weight`` of modules of ``types``
    whose qualified name does not match ``skip`` (``fnmatch`` patterns) is touched.

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: ``amount`` outside ``[0, 1]``, an unknown ``scope``, or no layer selected.
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1], got {amount}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    targets = _targets(model, types, skip)
    if not targets:
        raise ValueError(f"no module of types {[t.__name__ for t in types]} to prune")
    if scope == "global":
        prune.global_unstructured(
            [(module, "weight") for _, module in targets],
            pruning_method=prune.L1Unstructured,
            amount=amount,
        )
    else:
        for _, module in targets:
            prune.l1_unstructured(module, "weight", amount=amount)  # type: ignore[no-untyped-call]
    for _, module in targets:
        prune.remove(module, "weight")  # type: ignore[no-untyped-call]
    return model


@dataclass
class SparsityReport:
    """Fraction of exact zeros in the weights of the selected layers.

    Attributes:
        per_layer: qualified name -> fraction of zeros in its ``weight``.
        zeros, total: counts over all selected weights.
    """

    per_layer: dict[str, float]
    zeros: int
    total: int

    @property
    def overall(self) -> float:
        """Zeros over entries, pooled over all selected weights."""
        return self.zeros / self.total if self.total else 0.0


def sparsity(
    model: nn.Module, types: tuple[type[nn.Module], ...] = DEFAULT_TYPES
) -> SparsityReport:
    """Count the real zeros in the ``weight`` of every module of ``types`` (biases excluded)."""
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for name, module in _targets(model, types, ()):
        weight = _weight(module)
        layer_zeros, layer_total = int((weight == 0).sum()), weight.numel()
        per_layer[name] = layer_zeros / layer_total if layer_total else 0.0
        zeros += layer_zeros
        total += layer_total
    return SparsityReport(per_layer, zeros, total)


def neuron_scores(up: nn.Linear, down: nn.Linear, gated: bool = False) -> torch.Tensor:
    """``[F]`` importance of each hidden neuron of the pair ``down(act(up(x)))``.

    The score of neuron ``i`` is ``||up rows of i||_2 * ||down.weight[:, i]||_2``: a bound on how
    much the neuron can move the output per unit of input (bias terms aside), and exactly 0 when
    its outgoing column is 0. With ``gated=True`` (SwiGLU ``gate_up``: rows ``[gate; up]``) the
    rows ``i`` and ``F + i`` of ``up`` together form neuron ``i``.
    """
    hidden = down.in_features
    expected = 2 * hidden if gated else hidden
    if up.out_features != expected:
        raise ValueError(
            f"up has {up.out_features} outputs but down has {hidden} inputs"
            + (" (gated: expected 2x)" if gated else "")
        )
    rows = up.weight.detach()
    incoming = (
        rows.view(2, hidden, -1).square().sum(dim=(0, 2)) if gated else rows.square().sum(dim=1)
    )
    outgoing = down.weight.detach().square().sum(dim=0)
    return (incoming * outgoing).sqrt()


def _sliced_linear(
    linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, rows) if rows is not None else bias)
    return new


def prune_ffn_neurons(
    up: nn.Linear, down: nn.Linear, amount: float, *, gated: bool = False
) -> tuple[nn.Linear, nn.Linear]:
    """Remove the ``round(amount * F)`` least important hidden neurons of an FFN pair.

    Builds new, smaller layers: ``up`` loses output rows (and bias entries), ``down`` loses the
    matching input columns; neuron order is kept. Scores are :func:`neuron_scores`. The caller
    puts the returned modules in place of the old ones (e.g. ``ffn.up, ffn.down = ...``).

    Args:
        up: ``D -> F`` (or ``D -> 2F`` with ``gated=True``, SwiGLU ``gate_up`` layout).
        down: ``F -> D``.
        amount: fraction of neurons to remove, in ``[0, 1)``; at least one neuron is kept.
        gated: ``up`` holds gate rows then up rows for each neuron.

    Returns:
        ``(new_up, new_down)``; with ``amount=0`` they compute exactly what ``up``/``down`` did.

    Raises:
        ValueError: ``amount`` outside ``[0, 1)`` or mismatched shapes.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    scores = neuron_scores(up, down, gated)
    hidden = scores.numel()
    keep_count = max(1, hidden - round(amount * hidden))
    keep = scores.topk(keep_count).indices.sort().values  # stable neuron order
    up_rows = torch.cat([keep, keep + hidden]) if gated else keep
    return _sliced_linear(up, up_rows, None), _sliced_linear(down, None, keep)
