"""The PiMoE layer: a router, an experts backend and optional shared experts, composed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pimoe.moe.config import MoEConfig
from pimoe.moe.dispatch import dispatch_combine
from pimoe.moe.experts import ExpertList, StackedExperts, SwiGLU
from pimoe.moe.router import Router, RouterOutput
from pimoe.moe.stats import RoutingStats


class MoEOutput(nn.Module):
    """What every MoE layer does after its routed experts: add the shared experts' output and
    keep the call's routing, from which ``aux_loss``, ``z_loss`` and ``last_stats`` are computed
    on first access (a forward whose caller never reads them does not pay for them). Subclasses
    set ``shared`` (a module or None) and ``shared_gate`` (a ``Linear(D, 1)`` or None)."""

    shared: nn.Module | None
    shared_gate: nn.Module | None
    _route: RouterOutput | None = None
    _counts: Tensor | None = None
    _stats: RoutingStats | None = None
    _no_loss: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles start without the last call's routing: it holds that call's
        autograd graph, which ``copy.deepcopy`` refuses to copy."""
        state: dict[str, Any] = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        for name in ("_route", "_counts", "_stats", "_no_loss"):
            state.pop(name, None)
        return state

    @property
    def aux_loss(self) -> Tensor:
        """The last call's load-balancing loss (a scalar with gradients; 0 before any call)."""
        return self._route.aux_loss if self._route is not None else self._zero_loss()

    @property
    def z_loss(self) -> Tensor:
        """The last call's router z-loss (a scalar with gradients; 0 before any call)."""
        return self._route.z_loss if self._route is not None else self._zero_loss()

    @property
    def last_stats(self) -> RoutingStats | None:
        """The last call's :class:`RoutingStats` (None before any call or after an empty one)."""
        if self._stats is None and self._route is not None and self._counts is not None:
            self._stats = RoutingStats.from_routing(
                self._route.probs, self._route.mask, self._counts
            )
        return self._stats

    def _zero_loss(self) -> Tensor:
        return self._no_loss if self._no_loss is not None else torch.zeros(())

    def _record(
        self, route: RouterOutput | None, counts: Tensor | None, device: torch.device
    ) -> None:
        """Keep one call's routing (None: an empty input, whose losses are 0 on ``device``)."""
        self._route, self._counts, self._stats = route, counts, None
        self._no_loss = None if route is not None else torch.zeros((), device=device)

    def _finish(self, tokens: Tensor, out: Tensor, route: RouterOutput, counts: Tensor) -> Tensor:
        """``tokens [T, D]``, routed output ``out [T, D]`` -> layer output ``[T, D]``."""
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared
        self._record(route, counts, tokens.device)
        return out


class PiMoE(MoEOutput):
    """Token-level Mixture-of-Experts layer.

    Input ``[..., D]`` (e.g. ``[B, S, D]`` or ``[T, D]``), output of the same shape. Each token is
    routed to ``top_k`` of ``num_experts`` experts; their outputs are summed with the router's
    weights; shared experts (if any) see every token and are added.

    After each call: ``layer.aux_loss`` (load balancing, 1.0 when balanced) and ``layer.z_loss``
    hold scalar tensors with gradients that the caller adds to its loss with its own
    coefficients, and ``layer.last_stats`` holds a :class:`RoutingStats`.

    ``PiMoE(d_model, config)`` or ``PiMoE(d_model, num_experts=8, top_k=2, ffn_dim=512, ...)``:
    the options are the fields of :class:`~pimoe.moe.config.MoEConfig`, given as a config,
    keywords, or both (keywords win); ``layer.config`` is the result.

    Args:
        d_model: token width ``D``.
        config: the layer's :class:`MoEConfig` (default ``MoEConfig()``).
        experts: optional list of any ``nn.Module`` mapping ``[N, D] -> [N, D]``; if given, no
            built-in experts are created and ``num_experts`` is its length. A module with
            ``uses_positions = True`` is called as ``expert(x, positions=[N] long)``.
        **options: ``MoEConfig`` fields overriding ``config``.
    """

    def __init__(
        self,
        d_model: int,
        config: MoEConfig | None = None,
        *,
        experts: Sequence[nn.Module] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if experts is not None:
            if options.get("num_experts", len(experts)) != len(experts):
                raise ValueError(
                    f"num_experts={options['num_experts']} but {len(experts)} experts were given"
                )
            options["num_experts"] = len(experts)
        self.config = config = MoEConfig.build(config, options)
        self.d_model, self.num_experts, self.top_k = d_model, config.num_experts, config.top_k
        self.ffn_dim = config.expert_width(d_model)
        self.check_finite = config.check_finite
        self.router = Router(d_model, config)
        self.experts: nn.Module = (
            ExpertList(experts)
            if experts is not None
            else StackedExperts(
                config.num_experts,
                d_model,
                self.ffn_dim,
                config.activation,
                config.bias,
                config.backend,
            )
        )
        width = config.shared_experts * (config.shared_ffn_dim or self.ffn_dim)
        self.shared = SwiGLU(d_model, width) if config.shared_experts else None
        self.shared_gate = (
            nn.Linear(d_model, 1, bias=False)
            if config.shared_experts and config.shared_gate
            else None
        )

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

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """``x [..., D]`` -> ``[..., D]``.

        ``positions``: optional long tensor of shape ``x.shape[:-1]``, each token's position,
        handed to the experts with their rows (default: the index into ``x.reshape(-1, D)``).
        A model decoding with a KV cache passes absolute positions, so that a position-aware
        expert (a computation expert) sees the same positions as without the cache.
        """
        self._check_input(x)
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)  # [T, D]
        if positions is not None:
            if positions.shape != shape[:-1] or positions.dtype != torch.long:
                raise ValueError(
                    f"positions must be a long tensor of shape {tuple(shape[:-1])}, got "
                    f"{positions.dtype} {tuple(positions.shape)}"
                )
            positions = positions.reshape(-1)
        if tokens.shape[0] == 0:
            self._record(None, None, tokens.device)
            return x.clone()
        route = self.router(tokens, seq_len=shape[-2] if len(shape) > 2 else None)
        out, counts = dispatch_combine(tokens, route, self.experts, self.num_experts, positions)
        return self._finish(tokens, out, route, counts).reshape(shape)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"
