"""The search space: PiMoE model shapes and the compression applied after training.

A :class:`Candidate` is one point of the space: an :class:`~pimoe.moe.model.LMConfig` for the
model and a :class:`Compression` for what is done to it once trained. :meth:`SearchSpace.sample`
draws one from an Optuna trial, :meth:`SearchSpace.validate` rejects empty or contradictory spaces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING

from pimoe.moe.model import LMConfig

if TYPE_CHECKING:
    import optuna

QUANT_BITS = (32, 8, 4)  # 32: float32 kept; 8: int8 dynamic (torch.ao); 4: int4 weight-only


@dataclass(frozen=True)
class Compression:
    """What :func:`pimoe.search.objective.compress_model` applies to a trained model, in this
    order: low rank (``low_rank_ratio < 1``), magnitude pruning (``sparsity > 0``), quantization
    (``bits < 32``)."""

    bits: int = 32
    sparsity: float = 0.0
    low_rank_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {self.bits}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 < self.low_rank_ratio <= 1.0:
            raise ValueError(f"low_rank_ratio must be in (0, 1], got {self.low_rank_ratio}")


@dataclass(frozen=True)
class Candidate:
    """One configuration: the model and its post-training compression."""

    model: LMConfig
    compression: Compression

    def features(self) -> list[float]:
        """Numeric description for the performance predictor, in :data:`FEATURE_NAMES` order."""
        m, c = self.model, self.compression
        moe_layers = sum(m.is_moe(i) for i in range(m.n_layer))
        return [
            float(m.n_layer),
            math.log2(m.d_model),
            math.log2(m.moe.num_experts),
            float(m.moe.top_k),
            math.log2(m.ffn_dim),
            float(m.moe.shared_experts),
            float(moe_layers),
            math.log2(c.bits),
            c.sparsity,
            c.low_rank_ratio,
        ]

    def as_dict(self) -> dict[str, dict]:
        return {"model": asdict(self.model), "compression": asdict(self.compression)}


FEATURE_NAMES = (
    "n_layer",
    "log2_d_model",
    "log2_num_experts",
    "top_k",
    "log2_ffn_dim",
    "shared_experts",
    "moe_layers",
    "log2_bits",
    "sparsity",
    "low_rank_ratio",
)


@dataclass(frozen=True)
class SearchSpace:
    """Choices for each searched setting (Optuna categorical parameters of the same names).

    ``top_k`` larger than the sampled ``num_experts`` is clamped to it and ``moe_every`` larger
    than the sampled ``n_layer`` is clamped to it, so every candidate has at least one PiMoE layer
    (Optuna needs fixed choices per parameter); a ``top_k`` choice above every ``num_experts``
    choice is rejected.
    ``base`` holds the settings that are not searched (vocabulary, context, heads, ...).
    """

    n_layer: tuple[int, ...] = (1, 2, 3)
    d_model: tuple[int, ...] = (32, 64, 96)
    num_experts: tuple[int, ...] = (2, 4, 8)
    top_k: tuple[int, ...] = (1, 2)
    ffn_dim: tuple[int, ...] = (32, 64, 128)
    shared_experts: tuple[int, ...] = (0, 1)
    moe_every: tuple[int, ...] = (1, 2)
    bits: tuple[int, ...] = (32, 8, 4)
    sparsity: tuple[float, ...] = (0.0, 0.3, 0.6)
    low_rank_ratio: tuple[float, ...] = (1.0, 0.5, 0.25)
    base: LMConfig = field(default_factory=lambda: LMConfig(block_size=64, n_head=4))

    def __post_init__(self) -> None:
        self.validate()

    def choices(self) -> dict[str, tuple]:
        """Searched setting -> its choices."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "base"}

    def validate(self) -> None:
        """Raise ``ValueError`` for an empty, out-of-range or contradictory space."""
        for name, options in self.choices().items():
            if not isinstance(options, tuple) or len(options) == 0:
                raise ValueError(
                    f"search space: {name} needs a non-empty tuple of choices, got {options!r}"
                )
            if len(set(options)) != len(options):
                raise ValueError(f"search space: {name} has duplicate choices {options}")
        for name in ("n_layer", "d_model", "num_experts", "top_k", "ffn_dim"):
            if min(getattr(self, name)) < 1:
                raise ValueError(
                    f"search space: {name} choices must be >= 1, got {getattr(self, name)}"
                )
        if min(self.shared_experts) < 0 or min(self.moe_every) < 1:
            raise ValueError("search space: shared_experts must be >= 0 and moe_every >= 1")
        if max(self.top_k) > max(self.num_experts):
            raise ValueError(
                f"search space: top_k choice {max(self.top_k)} exceeds every num_experts choice "
                f"{self.num_experts}"
            )
        bad_width = [d for d in self.d_model if d % self.base.n_head]
        if bad_width:
            raise ValueError(
                f"search space: d_model {bad_width} not divisible by n_head={self.base.n_head}"
            )
        for bits in self.bits:
            Compression(bits=bits)
        for sparsity in self.sparsity:
            Compression(sparsity=sparsity)
        for ratio in self.low_rank_ratio:
            Compression(low_rank_ratio=ratio)

    def sample(self, trial: optuna.Trial) -> Candidate:
        """Draw one :class:`Candidate` with ``trial.suggest_categorical`` for every setting."""
        pick = {
            name: trial.suggest_categorical(name, options)
            for name, options in self.choices().items()
        }
        return self.candidate(pick)

    def candidate(self, params: dict) -> Candidate:
        """The :class:`Candidate` for a dict of chosen values (e.g. ``trial.params``)."""
        missing = sorted(set(self.choices()) - set(params))
        if missing:
            raise ValueError(f"missing search parameters {missing}")
        moe = self.base.moe.replace(
            num_experts=int(params["num_experts"]),
            top_k=min(int(params["top_k"]), int(params["num_experts"])),
            ffn_dim=int(params["ffn_dim"]),
            shared_experts=int(params["shared_experts"]),
        )
        model = replace(
            self.base,
            n_layer=int(params["n_layer"]),
            d_model=int(params["d_model"]),
            moe_every=min(int(params["moe_every"]), int(params["n_layer"])),
            moe=moe,
        )
        compression = Compression(
            bits=int(params["bits"]),
            sparsity=float(params["sparsity"]),
            low_rank_ratio=float(params["low_rank_ratio"]),
        )
        return Candidate(model, compression)
