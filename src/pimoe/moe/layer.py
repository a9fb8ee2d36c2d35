"""The PiMoE layer: a router, an experts backend and optional shared experts, composed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pimoe.moe.dispatch import dispatch_combine
from pimoe.moe.experts import Activation, ExpertList, StackedExperts, SwiGLU
from pimoe.moe.router import Router, RouterOutput, Routing, Score
from pimoe.moe.stats import RoutingStats


class MoEOutput(nn.Module):
    """What every MoE layer does after its routed experts: add the shared experts' output and
    record the call's auxiliary losses and routing statistics. Subclasses set ``shared``
    (a module or None) and ``shared_gate`` (a ``Linear(D, 1)`` or None)."""

    shared: nn.Module | None
    shared_gate: nn.Module | None

    def __getstate__(self) -> dict:
        """Copies and pickles start without the last call's losses and stats: those hold that
        call's autograd graph, which ``copy.deepcopy`` refuses to copy."""
        state = super().__getstate__().copy()
        state["aux_loss"] = state["z_loss"] = torch.zeros(())
        state["last_stats"] = None
        return state

    def _finish(self, tokens: Tensor, out: Tensor, route: RouterOutput, counts: Tensor) -> Tensor:
        """``tokens [T, D]``, routed output ``out [T, D]`` -> layer output ``[T, D]``."""
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared
        self.aux_loss, self.z_loss = route.aux_loss, route.z_loss
        self.last_stats = RoutingStats.from_routing(route.probs, route.mask, counts)
        return out


class PiMoE(MoEOutput):
    """Token-level Mixture-of-Experts layer.

    Input ``[..., D]`` (e.g. ``[B, S, D]`` or ``[T, D]``), output of the same shape. Each token is
    routed to ``top_k`` of ``num_experts`` experts; their outputs are summed with the router's
    weights; shared experts (if any) see every token and are added.

    After each call: ``layer.aux_loss`` (load balancing, 1.0 when balanced) and ``layer.z_loss``
    hold scalar tensors with gradients that the caller adds to its loss with its own
    coefficients, and ``layer.last_stats`` holds a :class:`RoutingStats`.

    Args:
        d_model: token width ``D``.
        num_experts: ``E`` (default 8), or inferred from ``experts``.
        top_k: experts per token.
        ffn_dim: hidden width of each built-in expert (default ``4 * d_model``; for SwiGLU the
            gate and up projections are each this wide).
        experts: optional list of any ``nn.Module`` mapping ``[N, D] -> [N, D]``; if given, no
            built-in experts are created.
        activation: built-in expert type: ``"swiglu"`` or an FFN with ``"gelu"``/``"relu"``/``"silu"``.
        bias: biases in the built-in experts.
        backend: built-in experts backend, ``"auto"``/``"loop"``/``"grouped_mm"`` (see
            :class:`StackedExperts`).
        shared_experts: number of always-on experts (merged into one SwiGLU of width
            ``shared_experts * shared_ffn_dim``, as in DeepSeek / Qwen2-MoE); 0 for none.
        shared_ffn_dim: width per shared expert (default ``ffn_dim``).
        shared_gate: scale the shared output by ``sigmoid(Linear(D, 1)(x))`` (Qwen2-MoE).
        score, normalize, noise_std, capacity_factor, routing: see :class:`Router`.
        check_finite: raise ``ValueError`` on NaN/inf input (costs one reduction per call).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int | None = None,
        top_k: int = 2,
        ffn_dim: int | None = None,
        *,
        experts: Sequence[nn.Module] | None = None,
        activation: Activation = "swiglu",
        bias: bool = False,
        backend: Literal["auto", "loop", "grouped_mm"] = "auto",
        shared_experts: int = 0,
        shared_ffn_dim: int | None = None,
        shared_gate: bool = False,
        score: Score = "softmax",
        normalize: bool = True,
        noise_std: float = 0.0,
        capacity_factor: float | None = None,
        routing: Routing = "token_choice",
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if experts is not None:
            if num_experts is not None and num_experts != len(experts):
                raise ValueError(f"num_experts={num_experts} but {len(experts)} experts were given")
            num_experts = len(experts)
        num_experts = 8 if num_experts is None else num_experts
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0, got {shared_experts}")
        ffn_dim = 4 * d_model if ffn_dim is None else ffn_dim
        self.d_model, self.num_experts, self.top_k, self.ffn_dim = d_model, num_experts, top_k, ffn_dim
        self.check_finite = check_finite
        self.router = Router(
            d_model, num_experts, top_k, score=score, normalize=normalize, noise_std=noise_std,
            capacity_factor=capacity_factor, routing=routing,
        )
        self.experts: nn.Module = (
            ExpertList(experts) if experts is not None
            else StackedExperts(num_experts, d_model, ffn_dim, activation, bias, backend)
        )
        width = shared_experts * (shared_ffn_dim or ffn_dim)
        self.shared = SwiGLU(d_model, width) if shared_experts else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_experts and shared_gate else None
        self.aux_loss: Tensor = torch.zeros(())
        self.z_loss: Tensor = torch.zeros(())
        self.last_stats: RoutingStats | None = None

    @classmethod
    def from_hf(cls, block: nn.Module) -> PiMoE:
        """Build a layer with the weights of a transformers ``MixtralSparseMoeBlock`` or
        ``Qwen2MoeSparseMoeBlock``; its output matches the block's to float tolerance."""
        from pimoe.moe.hf import from_hf_block

        return from_hf_block(cls, block)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input [..., {self.d_model}], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {x.dtype}")
        param_dtype = self.router.gate.weight.dtype
        if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} does not match the layer's {param_dtype}; cast one of them "
                "(layer.to(dtype)) or run under torch.autocast"
            )
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError("input contains NaN or inf")

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``."""
        self._check_input(x)
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)  # [T, D]
        if tokens.shape[0] == 0:
            self.aux_loss = self.z_loss = tokens.new_zeros((), dtype=torch.float32)
            self.last_stats = None
            return x.clone()
        route = self.router(tokens)
        out, counts = dispatch_combine(tokens, route, self.experts, self.num_experts)
        return self._finish(tokens, out, route, counts).reshape(shape)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"
