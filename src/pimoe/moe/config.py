"""``MoEConfig``: every setting of an MoE layer in one dataclass.

``Router``, ``PiMoE`` and ``LMConfig`` take it, and saved models store it (``to_dict`` /
``from_dict``), so an option is declared, documented and validated once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

Score = Literal["softmax", "sigmoid"]
Routing = Literal["token_choice", "expert_choice"]
Activation = Literal["swiglu", "gelu", "relu", "silu"]
Balance = Literal["aux_loss", "bias"]

_SCORES = ("softmax", "sigmoid")
_ROUTINGS = ("token_choice", "expert_choice")
_ACTIVATIONS = ("swiglu", "gelu", "relu", "silu")
_BALANCES = ("aux_loss", "bias")


@dataclass(frozen=True)
class MoEConfig:
    """Settings of one MoE layer (the model width ``D`` is the layer's, not the config's).

    Routing:
        num_experts: ``E`` routed experts (>= 1).
        top_k: experts per token ``k`` (1 <= k <= E); for expert-choice routing, the average.
        score: ``"softmax"`` (Mixtral / Switch) or ``"sigmoid"`` (DeepSeek-V3 independent scores).
        normalize: renormalize the ``k`` selected weights to sum to 1 (Qwen2-MoE's ``norm_topk_prob``).
        weight_outputs: multiply each selected expert's output by its routing weight. ``False``
            sums the selected experts' outputs unweighted (MoEfication); the router then only
            selects.
        noise_std: Gaussian noise on the logits in training only (noisy gating); 0 disables it.
        capacity_factor: ``None`` = dropless; else each expert takes at most
            ``ceil(capacity_factor * T * k / E)`` assignments (first choices first).
        routing: ``"token_choice"`` or ``"expert_choice"`` (each expert picks its tokens; not causal).
        router_bias: a bias in the gate ``Linear``.

    Experts:
        ffn_dim: hidden width of one built-in expert (``None``: ``4 * D``).
        activation: ``"swiglu"`` or an FFN with ``"gelu"``/``"relu"``/``"silu"``.
        bias: biases in the built-in experts.
        backend: experts backend name from :mod:`pimoe.moe.backends` (``"auto"``, ``"loop"``,
            ``"grouped_mm"``, or one registered by the user).
        shared_experts: always-on experts, merged into one SwiGLU of width
            ``shared_experts * shared_ffn_dim`` (DeepSeek / Qwen2-MoE); 0 for none.
        shared_ffn_dim: width per shared expert (``None``: ``ffn_dim``).
        shared_gate: scale the shared output by ``sigmoid(Linear(D, 1)(x))`` (Qwen2-MoE).

    Balancing (used by models that add the losses, e.g. ``PiMoELM``):
        balance: ``"aux_loss"`` (Switch Transformer: balance through the loss ``aux_loss``) or
            ``"bias"`` (DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias, the
            router's ``e_score_correction_bias`` buffer, is added to the scores to *select* the
            experts, never to the combine weights, and :func:`pimoe.moe.update_routing_bias`
            moves it after each optimizer step by ``bias_update_rate * sign(mean_load - load_e)``).
            With ``"bias"`` the router's ``aux_loss`` is the *sequence-wise* balance loss
            (DeepSeek-V3 eq. 17-20: the Switch loss of each sequence, averaged), which
            ``aux_loss_coef`` weights (DeepSeek-V3 used 1e-4; 0 turns it off).
        bias_update_rate: ``u``, the bias step per update (``"bias"`` only; DeepSeek-V3: 1e-3).
        aux_loss_coef: coefficient of the load-balancing loss.
        z_loss_coef: coefficient of the router z-loss.

    Checks:
        check_finite: raise ``ValueError`` on NaN/inf input (one reduction per call).
    """

    num_experts: int = 8
    top_k: int = 2
    score: Score = "softmax"
    normalize: bool = True
    weight_outputs: bool = True
    noise_std: float = 0.0
    capacity_factor: float | None = None
    routing: Routing = "token_choice"
    router_bias: bool = False
    ffn_dim: int | None = None
    activation: Activation = "swiglu"
    bias: bool = False
    backend: str = "auto"
    shared_experts: int = 0
    shared_ffn_dim: int | None = None
    shared_gate: bool = False
    balance: Balance = "aux_loss"
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    check_finite: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {self.score!r}")
        if self.routing not in _ROUTINGS:
            raise ValueError(f"routing must be one of {_ROUTINGS}, got {self.routing!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a backend name, got {type(self.backend).__name__}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
        for name in ("ffn_dim", "shared_ffn_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0, got {self.shared_experts}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("aux_loss_coef and z_loss_coef must be >= 0")
        if self.balance not in _BALANCES:
            raise ValueError(f"balance must be one of {_BALANCES}, got {self.balance!r}")
        if not self.bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.balance == "bias" and self.routing != "token_choice":
            raise ValueError(
                "balance='bias' needs routing='token_choice' (expert choice is balanced by construction)"
            )

    def expert_width(self, d_model: int) -> int:
        """Hidden width of one built-in expert for model width ``d_model``."""
        return 4 * d_model if self.ffn_dim is None else self.ffn_dim

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with ``changes`` applied (validated); unknown names raise ``TypeError``."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what saved models store)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        """Inverse of :meth:`to_dict`; ``ValueError`` names unknown keys."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a dict, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown MoEConfig keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def build(cls, config: MoEConfig | None, options: dict[str, Any]) -> MoEConfig:
        """``config`` (default ``MoEConfig()``) with keyword ``options`` applied: what
        ``Router(d, config, **options)`` and ``PiMoE(d, config, **options)`` accept."""
        if config is not None and not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        base = config or cls()
        if not options:
            return base
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown MoE option(s) {unknown}; valid options: {sorted(names)}")
        return replace(base, **options)
