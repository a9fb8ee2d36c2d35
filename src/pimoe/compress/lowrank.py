"""Low-rank factorization of Linear layers by truncated SVD.

A weight ``W [out, in]`` with singular values ``s_1 >= s_2 >= ...`` is replaced by the product of
two thinner Linears, ``W ~= B @ A`` with ``A = sqrt(S_r) V_r^T [r, in]`` and
``B = U_r sqrt(S_r) [out, r]`` (the Eckart-Young best rank-``r`` approximation in Frobenius norm).
The layer then costs ``r * (in + out)`` weights instead of ``in * out``; it only saves parameters
when ``r < in * out / (in + out)``. No retraining is done here: accuracy lost by truncation needs
a repair step (fine-tuning or distillation), which this module does not provide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pimoe.compress._modules import matches, plain_linears, set_module, tied_parameter_ids


class LowRankLinear(nn.Module):
    """``y = second(first(x))``: ``in -> rank`` (no bias) then ``rank -> out`` (the original bias).

    Args:
        in_features, out_features: as in ``nn.Linear``.
        rank: inner width ``r`` (>= 1).
        bias: whether ``second`` has a bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Factorize ``linear`` at ``rank`` (clipped to ``min(in, out)``) by truncated SVD."""
        weight = linear.weight.detach()
        rank = min(rank, min(weight.shape))
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        return cls._from_svd(linear, u, s, vh, rank)

    @classmethod
    def _from_svd(
        cls, linear: nn.Linear, u: Tensor, s: Tensor, vh: Tensor, rank: int
    ) -> LowRankLinear:
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        root = s[:rank].sqrt()
        with torch.no_grad():
            module.first.weight.copy_(root[:, None] * vh[:rank])  # [r, in]
            module.second.weight.copy_(u[:, :rank] * root[None, :])  # [out, r]
            if linear.bias is not None:
                module.second.bias.copy_(linear.bias)
        return module

    def effective_weight(self) -> Tensor:
        """The effective ``[out, in]`` weight ``second.weight @ first.weight``."""
        weight: Tensor = self.second.weight @ self.first.weight
        return weight

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        out: Tensor = self.second(self.first(x))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest ``r`` whose top-``r`` singular values keep at least ``energy`` of ``sum(s**2)``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    squares = singular_values.double() ** 2
    total = squares.sum()
    if total == 0:
        return 1
    kept = squares.cumsum(0) / total
    # Tolerate rounding in the cumulative sum so that energy=1.0 gives the full numerical rank.
    reached = (kept >= energy - 1e-12).nonzero()
    return int(reached[0]) + 1 if reached.numel() else singular_values.numel()


def rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    """Largest ``r >= 1`` with ``r * (in + out) <= ratio * in * out`` (target parameter ratio)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    return max(1, int(ratio * in_features * out_features // (in_features + out_features)))


@dataclass
class LayerFactorization:
    """What :func:`factorize` did to one Linear.

    Attributes:
        name: qualified module name.
        in_features, out_features: the layer's shape.
        rank: chosen rank (``None`` when the layer was skipped before an SVD).
        params_before, params_after: weights + bias before and after (equal when skipped).
        relative_error: ``||W - W_r||_F / ||W||_F`` of the chosen rank (``None`` when not computed).
        replaced: whether the layer was replaced by a :class:`LowRankLinear`.
        reason: why it was skipped (empty when replaced).
    """

    name: str
    in_features: int
    out_features: int
    rank: int | None
    params_before: int
    params_after: int
    relative_error: float | None
    replaced: bool
    reason: str = ""


@dataclass
class FactorizationReport:
    """Per-layer results of :func:`factorize` and their totals (Linear layers only)."""

    layers: list[LayerFactorization] = field(default_factory=list)

    @property
    def replaced(self) -> list[LayerFactorization]:
        """Layers that were factorized."""
        return [layer for layer in self.layers if layer.replaced]

    @property
    def params_before(self) -> int:
        """Parameters of all visited Linear layers before."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the same layers after."""
        return sum(layer.params_after for layer in self.layers)


def factorize(
    model: nn.Module,
    energy: float | None = None,
    ratio: float | None = None,
    *,
    min_features: int = 1,
    skip: Iterable[str] = (),
) -> FactorizationReport:
    """Replace ``nn.Linear`` layers of ``model`` in place by :class:`LowRankLinear`.

    The rank of each layer is chosen by one rule: ``energy`` (keep the smallest rank whose squared
    singular values sum to at least this fraction of the total; default 0.95 when neither rule is
    given) or ``ratio`` (the largest rank whose parameter count is at most ``ratio`` times the
    dense weight's). A layer is left as it is when the chosen rank would not save parameters
    (``rank * (in + out) >= in * out``), when ``min(in, out) < min_features``, when its weight
    is tied to another module, or when its qualified name matches a pattern in ``skip``
    (``fnmatch`` syntax, e.g. ``"lm_head"`` or ``"blocks.*.attn.*"``).

    Only modules of exact type ``nn.Linear`` are visited (see
    :func:`pimoe.compress._modules.plain_linears`). The model's outputs change by the truncation
    error; the report gives each layer's relative Frobenius error.

    Raises:
        ValueError: both rules given, a rule out of range, ``min_features < 1``, or ``model`` is a
            bare ``nn.Linear`` (use :meth:`LowRankLinear.from_linear`).
    """
    if energy is not None and ratio is not None:
        raise ValueError("give either energy or ratio, not both")
    if ratio is None and energy is None:
        energy = 0.95
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if min_features < 1:
        raise ValueError(f"min_features must be >= 1, got {min_features}")
    skip = tuple(skip)
    tied = tied_parameter_ids(model)
    report = FactorizationReport()
    for name, linear in list(plain_linears(model)):
        n_in, n_out = linear.in_features, linear.out_features
        bias = 0 if linear.bias is None else n_out
        before = n_in * n_out + bias

        def skipped(
            reason: str,
            rank: int | None = None,
            error: float | None = None,
            name: str = name,
            n_in: int = n_in,
            n_out: int = n_out,
            before: int = before,
        ) -> None:
            report.layers.append(
                LayerFactorization(name, n_in, n_out, rank, before, before, error, False, reason)
            )

        if matches(name, skip):
            skipped("matches skip")
            continue
        if min(n_in, n_out) < min_features:
            skipped(f"min(in, out) < min_features={min_features}")
            continue
        if id(linear.weight) in tied:
            skipped("weight is tied to another module")
            continue
        if ratio is not None:
            rank = rank_for_ratio(n_in, n_out, ratio)
            if rank * (n_in + n_out) >= n_in * n_out:
                skipped("rank for ratio would not save parameters", rank)
                continue
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        if energy is not None:
            rank = rank_for_energy(s, energy)
        rank = min(rank, s.numel())
        squares = s**2
        total = squares.sum()
        error = float((squares[rank:].sum() / total).sqrt()) if total > 0 else 0.0
        if rank * (n_in + n_out) >= n_in * n_out:
            skipped("rank would not save parameters", rank, error)
            continue
        set_module(model, name, LowRankLinear._from_svd(linear, u, s, vh, rank))
        after = rank * (n_in + n_out) + bias
        report.layers.append(
            LayerFactorization(name, n_in, n_out, rank, before, after, error, True)
        )
    return report
