"""Experts: single modules, presets, and the two expert banks the dispatcher calls.

A bank is called as ``bank(x_sorted [N, D], counts [E], positions [N] | None) -> [N, D]``: the
rows are sorted by expert, expert ``e`` is run once on its contiguous slice, and ``positions``
are the rows' token positions. ``ExpertList`` holds any ``nn.Module`` experts (an expert with
``uses_positions = True``, such as a computation expert, is also given its rows' positions);
``StackedExperts`` holds identical-shape FFN experts as 3-D weights (the layout of Hugging
Face's Mixtral and Qwen2-MoE experts), run by a backend from :mod:`pimoe.moe.backends`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pimoe.moe.backends import check_backend, get_experts_backend
from pimoe.moe.config import Activation
from pimoe.moe.dispatch import PAD_LIMIT, PAD_LIMIT_VS_GROUPED_MM
from pimoe.moe.grouped import (
    EXPERT_MAJOR_MIN_BYTES,
    EXPERT_MAJOR_MIN_HIDDEN_BYTES,
    expert_major_ffn,
    grouped_mm_usable,
)
from pimoe.moe.threaded import swiglu, threaded_usable

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def kernel_pad_limit(
    w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None
) -> float | None:
    """The padding the dispatcher may add for :func:`pimoe.moe.grouped.grouped_ffn` on these
    weights (buffer rows over executed rows; None: none). None where the exact rows run
    :mod:`pimoe.moe.threaded` (several threads, no biases, the extension built: on the quiet
    2-core machine it beat padding in all eight rows of
    ``python benchmarks/moe_padding_vs_grouped_mm.py``, docs/benchmarks.md); else
    :data:`pimoe.moe.dispatch.PAD_LIMIT` where torch's ``grouped_mm`` cannot run them (biases,
    float64, unaligned strides: the alternative is one matmul per expert);
    :data:`pimoe.moe.dispatch.PAD_LIMIT_VS_GROUPED_MM` where it can and torch uses more than one
    thread; None on one thread, where ``grouped_mm`` on the exact rows was faster."""
    if b_in is None and b_out is None and threaded_usable(None, w_in, w_out):
        return None
    if not grouped_mm_usable(w_in, b_in, w_out, b_out):
        return PAD_LIMIT
    return PAD_LIMIT_VS_GROUPED_MM if torch.get_num_threads() > 1 else None


def activation_function(activation: str) -> Callable[[Tensor], Tensor]:
    """The function of a ``StackedExperts`` activation name: ``[n, F_in] -> [n, F]``."""
    return swiglu if activation == "swiglu" else _ACTIVATIONS[activation]


def _check_activation(activation: str) -> None:
    if activation != "swiglu" and activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose swiglu, gelu, relu or silu")


class FFN(nn.Module):
    """Two-layer feed-forward expert ``D -> F -> D`` with a pointwise activation (GPT-2 style)."""

    def __init__(
        self, d_model: int, ffn_dim: int, activation: str = "gelu", bias: bool = True
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose gelu, relu or silu")
        self.activation = activation
        self.up = nn.Linear(d_model, ffn_dim, bias=bias)
        self.down = nn.Linear(ffn_dim, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # [N, D] -> [N, D]
        out: Tensor = self.down(_ACTIVATIONS[self.activation](self.up(x)))
        return out


class SwiGLU(nn.Module):
    """Gated expert ``down(silu(gate(x)) * up(x))`` (LLaMA / Mixtral); gate and up in one Linear."""

    def __init__(self, d_model: int, ffn_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * ffn_dim, bias=bias)  # rows: [gate; up]
        self.down = nn.Linear(ffn_dim, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # [N, D] -> [N, D]
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        out: Tensor = self.down(F.silu(gate) * up)
        return out


def _round(value: float, multiple: int = 16) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


# Presets are names for architecture choices, nothing more: what an expert is good at comes from
# training, not from its name. They give the typed expert names a concrete, documented meaning.
EXPERT_PRESETS: dict[str, Callable[[int], nn.Module]] = {
    # Classic Transformer FFN (GPT-2): GELU, 4x width.
    "language": lambda d: FFN(d, 4 * d, "gelu"),
    # LLaMA-style gated FFN at the parameter count of a 4x FFN (8/3 x width).
    "reasoning": lambda d: SwiGLU(d, _round(8 * d / 3)),
    # A wider gated FFN (4x width, 1.5x the parameters of "reasoning") for dense numeric patterns.
    "mathematical": lambda d: SwiGLU(d, 4 * d),
    # A narrow ReLU FFN (2x width): sparse, cheap activations.
    "logical": lambda d: FFN(d, 2 * d, "relu"),
}


def make_expert(preset: str, d_model: int) -> nn.Module:
    """Build an expert from a preset name (see ``EXPERT_PRESETS``)."""
    if preset not in EXPERT_PRESETS:
        raise ValueError(f"unknown expert preset {preset!r}; choose from {sorted(EXPERT_PRESETS)}")
    return EXPERT_PRESETS[preset](d_model)


class ExpertList(nn.Module):
    """Backend for arbitrary expert modules: one call per expert on its contiguous slice."""

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(experts) < 1:
            raise ValueError("need at least one expert")
        self.experts = nn.ModuleList(experts)

    def __len__(self) -> int:
        return len(self.experts)

    def forward(self, x_sorted: Tensor, counts: Tensor, positions: Tensor | None = None) -> Tensor:
        """``x_sorted [N, D]``, ``counts [E]``, ``positions [N]`` or None -> ``[N, D]``."""
        splits = counts.tolist()
        chunks = torch.split(x_sorted, splits)
        where = torch.split(positions, splits) if positions is not None else [None] * len(chunks)
        outputs = []
        for expert, chunk, pos in zip(self.experts, chunks, where):
            if chunk.shape[0] == 0:
                continue
            if getattr(expert, "uses_positions", False):
                if pos is None:
                    raise ValueError(
                        f"{type(expert).__name__} needs token positions; the caller gave none"
                    )
                outputs.append(expert(chunk, positions=pos))
            else:
                outputs.append(expert(chunk))
        if not outputs:
            return x_sorted.new_zeros(x_sorted.shape)
        return torch.cat(outputs, dim=0)


class StackedExperts(nn.Module):
    """``E`` identical FFN experts stored as 3-D weights.

    Weights: ``w_in [E, F_in, D]`` (``F_in = 2F`` for SwiGLU: gate rows then up rows, as in
    Hugging Face's ``gate_up_proj``) and ``w_out [E, D, F]``; optional biases ``[E, F_in]``,
    ``[E, D]``.

    Args:
        backend: a name from :mod:`pimoe.moe.backends`: ``"loop"`` runs each expert's FFN on its
            slice inside a single autograd node (:func:`pimoe.moe.grouped.grouped_ffn`).
            ``"grouped_mm"`` uses ``torch.nn.functional.grouped_mm`` (one kernel, no host sync;
            for CUDA, where it is fastest in bf16).
            ``"auto"`` picks grouped_mm for bf16 weights on CUDA when torch has it, else loop.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        ffn_dim: int,
        activation: Activation = "swiglu",
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_activation(activation)
        check_backend(backend)
        self.num_experts, self.d_model, self.ffn_dim = num_experts, d_model, ffn_dim
        self.activation = activation
        self.backend = backend
        f_in = 2 * ffn_dim if activation == "swiglu" else ffn_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, f_in, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))
        self.b_in = nn.Parameter(torch.zeros(num_experts, f_in)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same init as ``nn.Linear`` for each expert."""
        for weight in (self.w_in, self.w_out):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)

    def __len__(self) -> int:
        return self.num_experts

    @property
    def activation_fn(self) -> Callable[[Tensor], Tensor]:
        """The experts' activation as a function ``[n, F_in] -> [n, F]`` (SwiGLU: ``silu(gate) *
        up``); one of :data:`pimoe.moe.threaded.FUSED_ACTIVATIONS`, which the threaded kernel runs
        inside its per-expert C++ loop."""
        return activation_function(self.activation)

    def act(self, h: Tensor) -> Tensor:
        """The experts' activation: ``[n, F_in] -> [n, F]`` (SwiGLU: ``silu(gate) * up``)."""
        return activation_function(self.activation)(h)

    def _stored(self, name: str) -> Tensor:
        """Parameter ``name`` as stored (its device, dtype and strides pick the kernel), without
        evaluating a parametrization of it (a LoRA adapter would form ``W + B A`` on every read)."""
        if parametrize.is_parametrized(self, name):
            original: Tensor = self.parametrizations[name].original  # type: ignore[index,union-attr]
            return original
        weight: Tensor = getattr(self, name)
        return weight

    @property
    def pad_limit(self) -> float | None:
        """How much padding the dispatcher may add so that every expert has the same row count
        (the buffer's rows over the executed rows; None: none): only for the built-in ``"loop"``
        kernel, which then runs all experts as batched matmuls (:func:`kernel_pad_limit`)."""
        w_in = self._stored("w_in")
        if get_experts_backend(self.backend, w_in) is not get_experts_backend("loop", w_in):
            return None
        return kernel_pad_limit(w_in, self.b_in, self._stored("w_out"), self.b_out)

    @property
    def accepts_padding(self) -> bool:
        """Whether the dispatcher may pad every expert to the same row count (:attr:`pad_limit`
        is not None)."""
        return self.pad_limit is not None

    def runs_expert_major(self, rows: int) -> bool:
        """Whether a forward of ``rows`` routed rows without autograd should run expert by expert
        from gather to weighted sum (:meth:`expert_major`): the built-in ``"loop"`` kernel, no
        autocast, and gathering all rows ``[rows, D]`` would take at least
        :data:`pimoe.moe.grouped.EXPERT_MAJOR_MIN_BYTES` or their hidden activations
        ``[rows, F_in]`` at least :data:`pimoe.moe.grouped.EXPERT_MAJOR_MIN_HIDDEN_BYTES`."""
        w_in = self._stored("w_in")
        if get_experts_backend(self.backend, w_in) is not get_experts_backend("loop", w_in):
            return False
        if torch.is_autocast_enabled(w_in.device.type):
            return False
        row_bytes = rows * w_in.element_size()
        return (
            row_bytes * w_in.shape[2] >= EXPERT_MAJOR_MIN_BYTES
            or row_bytes * w_in.shape[1] >= EXPERT_MAJOR_MIN_HIDDEN_BYTES
        )

    def expert_major(
        self, x: Tensor, token_rows: Tensor, row_weights: Tensor, splits: list[int]
    ) -> Tensor:
        """Routed output ``[T, D]`` of tokens ``x [T, D]`` without autograd, expert by expert
        (:func:`pimoe.moe.grouped.expert_major_ffn`): ``token_rows [R]`` grouped by expert,
        ``row_weights [R]`` their combine weights, ``splits`` rows per expert."""
        return expert_major_ffn(
            x,
            token_rows,
            row_weights,
            self.w_in,
            self.b_in,
            self.w_out,
            self.b_out,
            splits,
            self.activation_fn,
        )

    def forward(self, x_sorted: Tensor, counts: Tensor, positions: Tensor | None = None) -> Tensor:
        """``x_sorted [N, D]``, ``counts [E]``, ``positions [N]`` or None -> ``[N, D]``."""
        backend = get_experts_backend(self.backend, self._stored("w_in"))
        return backend(self, x_sorted, counts, positions)

    def expert(self, e: int) -> nn.Module:
        """A standalone copy of expert ``e`` as a ``SwiGLU`` or ``FFN`` module."""
        with torch.no_grad():
            first: nn.Linear
            second: nn.Linear
            if self.activation == "swiglu":
                swiglu = SwiGLU(self.d_model, self.ffn_dim, bias=self.b_in is not None)
                module: nn.Module = swiglu
                first, second = swiglu.gate_up, swiglu.down
            else:
                ffn = FFN(self.d_model, self.ffn_dim, self.activation, bias=self.b_in is not None)
                module = ffn
                first, second = ffn.up, ffn.down
            first.weight.copy_(self.w_in[e])
            second.weight.copy_(self.w_out[e])
            if self.b_in is not None and self.b_out is not None:
                first.bias.copy_(self.b_in[e])
                second.bias.copy_(self.b_out[e])
        return module.to(self.w_in.device, self.w_in.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, ffn_dim={self.ffn_dim}, "
            f"activation={self.activation}, backend={self.backend}"
        )
