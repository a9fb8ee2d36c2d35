"""The configuration and output of :class:`~pimoe.moe.model.PiMoELM`, the small PiMoE language
model: :class:`LMConfig` (its hyperparameters, saved with the model) and :class:`LMOutput`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from torch import Tensor

from pimoe.moe.config import MoEConfig


def _default_moe() -> MoEConfig:
    return MoEConfig(ffn_dim=128)


@dataclass
class LMConfig:
    """Model hyperparameters; the defaults are the demo's byte-level model. The MoE layers'
    settings (experts, top-k, widths, routing, loss coefficients) are ``moe``."""

    vocab_size: int = 256  # byte-level
    block_size: int = 128  # longest context
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    moe_every: int = 1  # a PiMoE FFN in every k-th block (blocks k-1, 2k-1, ...); 0 = all dense
    moe: MoEConfig = field(default_factory=_default_moe)
    dense_ffn_dim: int | None = (
        None  # dense blocks' width; None = (top_k + shared_experts) * ffn_dim
    )

    def __post_init__(self) -> None:
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"moe must be a MoEConfig, got {type(self.moe).__name__}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "moe_every"):
            _check_int(name, getattr(self, name))
        if self.dense_ffn_dim is not None:
            _check_int("dense_ffn_dim", self.dense_ffn_dim)
            if self.dense_ffn_dim < 1:
                raise ValueError(f"dense_ffn_dim must be >= 1 or None, got {self.dense_ffn_dim}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"dropout must be a float, got {type(self.dropout).__name__}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.moe_every < 0:
            raise ValueError(f"moe_every must be >= 0, got {self.moe_every}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def ffn_dim(self) -> int:
        """Hidden width of one routed expert."""
        return self.moe.expert_width(self.d_model)

    @property
    def dense_width(self) -> int:
        """Hidden width of the dense SwiGLU blocks: by default, the active width of an MoE block."""
        return self.dense_ffn_dim or (self.moe.top_k + self.moe.shared_experts) * self.ffn_dim

    def parameter_bound(self) -> int:
        """An upper bound of the model's parameter count, from the config alone (nothing is
        built): what a loader checks before building a model a file describes."""
        d, moe = self.d_model, self.moe
        width, shared = self.ffn_dim, moe.shared_ffn_dim or self.ffn_dim
        # per expert: weights <= 3 d F (SwiGLU), biases <= 2F + d (SwiGLU's gate and up rows),
        # a router row and bias (d + 1)
        routed = moe.num_experts * (3 * d * width + 2 * width + 2 * d + 1)
        always_on = moe.shared_experts * (3 * d * shared + 2 * shared + d) + d + 1
        dense = 3 * d * self.dense_width + self.dense_width + d
        moe_layers = self.n_layer // self.moe_every if self.moe_every else 0
        ffns = moe_layers * (routed + always_on) + (self.n_layer - moe_layers) * dense
        attention = self.n_layer * (4 * d * (d + 1) + 4 * d)
        return attention + ffns + (2 * self.vocab_size + self.block_size + 2) * d

    def is_moe(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has a PiMoE feed-forward layer."""
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    def dense_twin(self) -> LMConfig:
        """The all-dense config with the same active parameters per token (router gates aside)."""
        return replace(self, moe_every=0, dense_ffn_dim=self.dense_width)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``moe`` nested), what :meth:`PiMoELM.save` stores."""
        return {**asdict(self), "moe": self.moe.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        """Inverse of :meth:`to_dict`. Also reads the flat layout of older files (``num_experts``,
        ``top_k``, ``ffn_dim``, ``shared_experts``, ``aux_loss_coef``, ``z_loss_coef`` at the top
        level). Unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a dict, got {type(data).__name__}")
        data = dict(data)
        moe = dict(data.pop("moe", None) or {"ffn_dim": 128})
        for key in _LEGACY_MOE_KEYS:
            if key in data:
                moe[key] = data.pop(key)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown LMConfig keys: {sorted(unknown)}")
        return cls(**data, moe=MoEConfig.from_dict(moe))


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


_LEGACY_MOE_KEYS = (
    "num_experts",
    "top_k",
    "ffn_dim",
    "shared_experts",
    "aux_loss_coef",
    "z_loss_coef",
)


@dataclass
class LMOutput:
    """``logits [B, S, V]``; ``loss = ce_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss``
    (``loss``/``ce_loss`` are None without targets); ``aux_loss`` and ``z_loss`` are sums over the
    MoE layers (zero for a dense model)."""

    logits: Tensor
    loss: Tensor | None
    ce_loss: Tensor | None
    aux_loss: Tensor
    z_loss: Tensor
