"""Fusion layers: several modalities in, one ``[B, d_model]`` vector out.

Every layer takes ``inputs: dict[str, Tensor]`` with, per configured modality ``m``, a tensor
``[B, D_m]`` (one token) or ``[B, S_m, D_m]`` (``S_m <= max_tokens`` tokens), maps each token to
``d_model`` with a per-modality two-layer MLP, adds a learned per-modality position embedding (so pooling keeps token order) and
fuses. Modalities are configured as ``{name: D_m}``.

Missing modalities (key absent or ``None``): with ``allow_missing=False`` (default) a
``ValueError`` names them. With ``allow_missing=True`` each missing modality is replaced by a
learned per-modality "missing" token (one ``[d_model]`` vector per example), so the layer's
arithmetic is unchanged; train with some modality dropout so that token means something. At
least one modality must be present.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Fusion(nn.Module):
    """Base class: input checks, per-modality projections, the missing-modality rule."""

    def __init__(
        self,
        modalities: dict[str, int],
        d_model: int,
        allow_missing: bool = False,
        min_modalities: int = 1,
        max_tokens: int = 64,
    ) -> None:
        super().__init__()
        if len(modalities) < min_modalities:
            raise ValueError(
                f"{type(self).__name__} needs at least {min_modalities} modalities, got {list(modalities)}"
            )
        for name, dim in modalities.items():
            if not isinstance(dim, int) or dim < 1:
                raise ValueError(
                    f"modality {name!r}: feature width must be a positive int, got {dim!r}"
                )
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.modalities, self.d_model, self.allow_missing = dict(modalities), d_model, allow_missing
        self.max_tokens = max_tokens
        self.proj = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))
                for m, dim in modalities.items()
            }
        )
        self.pos = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(max_tokens, d_model) * 0.02) for m in modalities}
        )
        self.missing = (
            nn.ParameterDict({m: nn.Parameter(torch.zeros(d_model)) for m in modalities})
            if allow_missing
            else None
        )

    def tokens(self, inputs: dict[str, Tensor | None]) -> dict[str, Tensor]:
        """Checked and projected tokens ``{m: [B, S_m, d_model]}``, in configured order."""
        if not isinstance(inputs, dict):
            raise TypeError(
                f"inputs must be a dict {{modality: tensor}}, got {type(inputs).__name__}"
            )
        unknown = set(inputs) - set(self.modalities)
        if unknown:
            raise ValueError(
                f"unknown modalities {sorted(unknown)}; configured: {list(self.modalities)}"
            )
        present = {m: x for m, x in inputs.items() if x is not None}
        absent = [m for m in self.modalities if m not in present]
        if not present:
            raise ValueError(f"no modality given; configured: {list(self.modalities)}")
        if absent and not self.allow_missing:
            raise ValueError(
                f"missing modalities {absent}; pass them or build the layer with allow_missing=True"
            )
        batch = None
        out: dict[str, Tensor] = {}
        for m, x in present.items():
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(
                    f"modality {m!r} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}"
                )
            if x.dim() not in (2, 3) or x.shape[-1] != self.modalities[m]:
                raise ValueError(
                    f"modality {m!r} must be [B, {self.modalities[m]}] or [B, S, {self.modalities[m]}], "
                    f"got {tuple(x.shape)}"
                )
            if x.dim() == 3 and not 1 <= x.shape[1] <= self.max_tokens:
                raise ValueError(
                    f"modality {m!r} has {x.shape[1]} tokens; 1 to max_tokens={self.max_tokens} allowed"
                )
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"modality {m!r} has batch size {x.shape[0]}, others {batch}")
            batch = x.shape[0]
            tokens = self.proj[m](x if x.dim() == 3 else x.unsqueeze(1))  # [B, S_m, d]
            out[m] = tokens + self.pos[m][: tokens.shape[1]]
        for m in absent:
            assert self.missing is not None
            out[m] = self.missing[m].expand(batch, 1, self.d_model)
        return {m: out[m] for m in self.modalities}

    def summaries(self, inputs: dict[str, Tensor | None]) -> list[Tensor]:
        """Mean-pooled projected tokens, one ``[B, d_model]`` per modality, in configured order."""
        return [t.mean(1) for t in self.tokens(inputs).values()]


class ConcatFusion(Fusion):
    """``GELU(Linear(concat_m h_m))``: late fusion by concatenation."""

    def __init__(
        self, modalities: dict[str, int], d_model: int = 64, allow_missing: bool = False
    ) -> None:
        super().__init__(modalities, d_model, allow_missing)
        self.out = nn.Sequential(nn.Linear(len(modalities) * d_model, d_model), nn.GELU())

    def forward(self, inputs: dict[str, Tensor | None]) -> Tensor:
        """``{m: [B, (S_m,) D_m]}`` -> ``[B, d_model]``."""
        return self.out(torch.cat(self.summaries(inputs), -1))


class GatedFusion(Fusion):
    """Gated multimodal unit (Arevalo et al. 2017) for M modalities: ``sum_m z_m * tanh(h_m)``
    with per-feature gates ``z = softmax over m of Linear(concat_m h_m)`` (for M = 2 this is the
    paper's ``z * tanh(h_1) + (1 - z) * tanh(h_2)``, ``z = sigmoid(...)``)."""

    def __init__(
        self, modalities: dict[str, int], d_model: int = 64, allow_missing: bool = False
    ) -> None:
        super().__init__(modalities, d_model, allow_missing, min_modalities=2)
        self.gate = nn.Linear(len(modalities) * d_model, len(modalities) * d_model)
        self.last_gates: Tensor | None = None

    def forward(self, inputs: dict[str, Tensor | None]) -> Tensor:
        """``{m: [B, (S_m,) D_m]}`` -> ``[B, d_model]``; ``last_gates`` holds ``[B, M, d_model]``."""
        h = torch.stack(self.summaries(inputs), 1)  # [B, M, d]
        gates = torch.softmax(self.gate(h.flatten(1)).view_as(h), 1)  # [B, M, d], sums to 1 over M
        self.last_gates = gates.detach()
        return (gates * torch.tanh(h)).sum(1)


class FiLMFusion(Fusion):
    """FiLM (Perez et al. 2018): the first configured modality's tokens are modulated by the others,
    ``ReLU((1 + gamma(c)) * x + beta(c))`` with ``c`` the mean of the other modalities' summaries,
    then mean-pooled."""

    def __init__(
        self, modalities: dict[str, int], d_model: int = 64, allow_missing: bool = False
    ) -> None:
        super().__init__(modalities, d_model, allow_missing, min_modalities=2)
        self.film = nn.Linear(d_model, 2 * d_model)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)  # starts as the identity modulation

    def forward(self, inputs: dict[str, Tensor | None]) -> Tensor:
        """``{m: [B, (S_m,) D_m]}`` -> ``[B, d_model]``."""
        tokens = list(self.tokens(inputs).values())
        condition = torch.stack([t.mean(1) for t in tokens[1:]]).mean(0)  # [B, d]
        gamma, beta = self.film(condition).unsqueeze(1).chunk(2, -1)  # [B, 1, d] each
        return torch.relu((1 + gamma) * tokens[0] + beta).mean(1)


class CrossAttentionFusion(Fusion):
    """Each modality's tokens attend to all other modalities' tokens (multi-head attention,
    residual, LayerNorm); the pooled results are concatenated and projected to ``d_model``."""

    def __init__(
        self,
        modalities: dict[str, int],
        d_model: int = 64,
        heads: int = 4,
        allow_missing: bool = False,
    ) -> None:
        super().__init__(modalities, d_model, allow_missing, min_modalities=2)
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.attn = nn.ModuleDict(
            {m: nn.MultiheadAttention(d_model, heads, batch_first=True) for m in modalities}
        )
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in modalities})
        self.out = nn.Sequential(nn.Linear(len(modalities) * d_model, d_model), nn.GELU())

    def forward(self, inputs: dict[str, Tensor | None]) -> Tensor:
        """``{m: [B, (S_m,) D_m]}`` -> ``[B, d_model]``."""
        tokens = self.tokens(inputs)
        pooled = []
        for m, q in tokens.items():
            context = torch.cat(
                [t for other, t in tokens.items() if other != m], 1
            )  # [B, S_other, d]
            attended, _ = self.attn[m](q, context, context, need_weights=False)
            pooled.append(self.norm[m](q + attended).mean(1))
        return self.out(torch.cat(pooled, -1))
