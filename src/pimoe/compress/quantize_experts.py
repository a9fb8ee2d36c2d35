"""Weight-only int8 and int4 quantization of fused 3-D expert weights (``[E, out, in]``).

``StackedExperts`` (and transformers' fused experts) hold every expert's weights in two 3-D
tensors, which Linear-based quantizers (bitsandbytes, torch.ao) leave in floating point. Here
they are quantized per expert, in torchao's weight-only conventions:

- int8: symmetric, one scale per output row: ``w = q * scale`` (``q`` in [-127, 127]); the
  matmul is ``torch.ops.aten._weight_int8pack_mm`` (CPU; dequantize-then-matmul elsewhere);
- int4: asymmetric groups of ``group_size`` input columns (torchao's "tinygemm" layout):
  ``w = (q - 8) * scale + zero``, ``q`` in [0, 15], packed two per byte by
  ``_convert_weight_to_int4pack_for_cpu``; the matmul is ``_weight_int4pack_mm_for_cpu``.

:class:`QuantizedFusedExperts` holds quantized 3-D weights; :class:`Int8StackedExperts` /
:class:`Int4StackedExperts` replace a PiMoE layer's ``StackedExperts``
(:func:`quantize_experts`). Inference runs each expert's FFN with the quantized matmuls through
:func:`grouped_ffn_with`; when a gradient is needed the weights are
dequantized and the float grouped kernel runs (gradients reach the inputs, not the codes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from pimoe.compress._modules import matches
from pimoe.moe.experts import StackedExperts
from pimoe.moe.grouped import grouped_ffn, per_expert
from pimoe.moe.layer import PiMoE
from pimoe.moe.threaded import Activation

BITS = (8, 4)
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts


def _int4_ops_available() -> bool:
    return hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(
        torch.ops.aten, "_weight_int4pack_mm_for_cpu"
    )


def int4_group_size(widths: Iterable[int], group_size: int = 128) -> int:
    """The int4 group size for weights with these input widths: the largest supported size
    <= ``group_size`` dividing every width; ``ValueError`` if none does."""
    widths = list(widths)
    for size in INT4_GROUP_SIZES:
        if size <= group_size and all(w % size == 0 for w in widths):
            return size
    raise ValueError(
        f"int4 needs input widths {widths} that are multiples of a group size in "
        f"{INT4_GROUP_SIZES} no larger than group_size={group_size}"
    )


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output row: ``[E, O, I]`` -> (codes int8 ``[E, O, I]``, scale ``[E, O]``
    in the weight's dtype)."""
    wide = weight.detach().float()
    scale = wide.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    codes = (wide / scale[..., None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    return codes, scale.to(weight.dtype).contiguous()


def _check_int4_device(tensor: Tensor) -> None:
    """``ValueError`` unless ``tensor`` is on the CPU: the int4 experts' packed layout and matmul
    are torch's CPU kernels (``_weight_int4pack_mm_for_cpu``); on other devices use int8."""
    if tensor.device.type != "cpu":
        raise ValueError(
            f"int4 fused experts run on the CPU only (torch's CPU int4 pack), got a tensor on "
            f"{tensor.device}; quantize with bits=8 for {tensor.device.type}, or keep the experts on the CPU"
        )


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 in groups of ``group_size`` input columns (torchao's tinygemm layout):
    ``[E, O, I]`` -> (packed uint8 ``[E, O, I / 2]``, scales_zeros ``[E, I / group_size, O, 2]``)."""
    if not _int4_ops_available():
        raise RuntimeError("int4 experts need torch's _weight_int4pack_mm_for_cpu (torch>=2.6)")
    _check_int4_device(weight)
    num_experts, out_features, in_features = weight.shape
    if out_features % 16:
        raise ValueError(f"int4 needs the output width ({out_features}) to be a multiple of 16")
    if group_size not in INT4_GROUP_SIZES or in_features % group_size:
        raise ValueError(
            f"group_size {group_size} must be in {INT4_GROUP_SIZES} and divide {in_features}"
        )
    groups = (
        weight.detach().float().reshape(num_experts, out_features, -1, group_size)
    )  # [E, O, G, gs]
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-6)  # [E, O, G]
    zero = low + 8 * scale  # w = (q - 8) * scale + zero; q = 0 at the group minimum
    q = (
        ((groups - low[..., None]) / scale[..., None])
        .round()
        .clamp(0, 15)
        .to(torch.int32)
        .flatten(-2)
    )
    packed = torch.stack(
        [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[e], 1) for e in range(num_experts)]
    )
    return packed, torch.stack([scale, zero], -1).transpose(1, 2).contiguous().to(weight.dtype)


class QuantizedFusedExperts(nn.Module, ABC):
    """Base of modules holding fused expert weights ``[E, out, in]`` as int8 rows or int4 groups.

    :meth:`quantize` registers, for a weight called ``name``: int8: ``{name}_int8 [E, O, I]``
    and ``{name}_scale [E, O]``; int4: ``{name}_int4 [E, O, I / 2]`` (packed) and
    ``{name}_scales_zeros [E, I / group_size, O, 2]``. Scales keep the source dtype.
    """

    bits: int
    group_size: int

    def quantize(self, name: str, weight: Tensor) -> None:
        """Quantize ``weight [E, out, in]`` into buffers named after ``name``."""
        if weight.dim() != 3 or not weight.is_floating_point():
            raise TypeError(
                f"expected a floating-point [E, out, in] {name}, got {weight.dtype} {tuple(weight.shape)}"
            )
        if self.bits == 8:
            codes, scale = quantize_int8(weight)
            self.register_buffer(f"{name}_int8", codes)
            self.register_buffer(f"{name}_scale", scale)
        else:
            packed, scales_zeros = quantize_int4(weight, self.group_size)
            self.register_buffer(f"{name}_int4", packed)
            self.register_buffer(f"{name}_scales_zeros", scales_zeros)

    def matmul(self, name: str, e: int, x: Tensor) -> Tensor:
        """``x [n, in] @ W[e].T -> [n, out]`` with the quantized kernel, in ``x``'s dtype."""
        x = x.contiguous()
        if self.bits == 8:
            codes, scale = (
                self._buffer(f"{name}_int8")[e],
                self._buffer(f"{name}_scale")[e].to(x.dtype),
            )
            if x.device.type != "cpu":
                return x @ (codes.to(x.dtype) * scale[:, None]).t()
            out: Tensor = torch.ops.aten._weight_int8pack_mm(x, codes, scale)
            return out
        packed, scales_zeros = (
            self._buffer(f"{name}_int4")[e],
            self._buffer(f"{name}_scales_zeros")[e],
        )
        _check_int4_device(packed)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, self.group_size, scales_zeros.to(x.dtype)
        )
        return out

    def _buffer(self, name: str) -> Tensor:
        value = getattr(self, name)
        if not isinstance(value, Tensor):
            raise AttributeError(f"{type(self).__name__} has no quantized buffer {name!r}")
        return value

    @abstractmethod
    def act(self, h: Tensor) -> Tensor:
        """The experts' activation ``[n, F_in] -> [n, F]`` (defined by subclasses)."""

    def dequantize(self, name: str, dtype: torch.dtype) -> Tensor:
        """The float weight ``[E, out, in]`` that :meth:`matmul` computes with."""
        if self.bits == 8:
            return (
                self._buffer(f"{name}_int8").to(dtype)
                * self._buffer(f"{name}_scale").to(dtype)[..., None]
            )
        packed = self._buffer(f"{name}_int4")
        eye = torch.eye(2 * packed.shape[-1], dtype=torch.float32, device=packed.device)  # [I, I]
        return torch.stack([self.matmul(name, e, eye).t() for e in range(len(packed))]).to(dtype)

    def grouped_forward(self, x_sorted: Tensor, counts: Tensor | list[int]) -> Tensor:
        """The experts' FFN on ``x_sorted [N, D]`` grouped by expert (``counts [E]``) -> ``[N, D]``.

        Uses the subclass's ``act``, ``b_in`` / ``b_out`` (or None) and the weights ``w_in`` /
        ``w_out``. Quantized matmuls without autograd; when ``x_sorted`` needs a gradient, the
        dequantized weights through :func:`pimoe.moe.grouped.grouped_ffn` (same values).
        """
        b_in: Tensor | None = getattr(self, "b_in", None)
        b_out: Tensor | None = getattr(self, "b_out", None)
        act = self.act
        if torch.is_grad_enabled() and x_sorted.requires_grad:
            w_in, w_out = (
                self.dequantize("w_in", x_sorted.dtype),
                self.dequantize("w_out", x_sorted.dtype),
            )
            return grouped_ffn(x_sorted, w_in, b_in, w_out, b_out, counts, act)

        def project_in(e: int, x: Tensor) -> Tensor:
            h = self.matmul("w_in", e, x)
            return h if b_in is None else h + b_in[e].to(h.dtype)

        def project_out(e: int, a: Tensor) -> Tensor:
            y = self.matmul("w_out", e, a)
            return y if b_out is None else y + b_out[e].to(y.dtype)

        out_features = getattr(self, f"w_out_int{self.bits}").shape[1]  # [E, out, in or in / 2]
        return grouped_ffn_with(x_sorted, counts, project_in, project_out, act, out_features)

    def quantized_nbytes(self) -> int:
        """Bytes of all buffers (codes, scales and any float biases)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class QuantizedStackedExperts(QuantizedFusedExperts):
    """A :class:`~pimoe.moe.experts.StackedExperts` with int8 or int4 weights (any activation).

    Quantized buffers of ``w_in [E, F_in, D]`` and ``w_out [E, D, F]`` (see
    :class:`QuantizedFusedExperts`), float buffers ``b_in [E, F_in]`` / ``b_out [E, D]`` when
    the source had biases. ``forward(x_sorted [N, D], counts [E], positions) -> [N, D]`` like
    the source.
    """

    accepts_padding = False  # no batched quantized matmul: padding rows would be pure waste

    def __init__(self, experts: StackedExperts, bits: int = 8, group_size: int = 128) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.ffn_dim = (
            experts.num_experts,
            experts.d_model,
            experts.ffn_dim,
        )
        if bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.activation, self.bits = experts.activation, bits
        self.group_size = (
            int4_group_size((experts.d_model, experts.ffn_dim), group_size) if bits == 4 else 0
        )
        self.quantize("w_in", experts.w_in)
        self.quantize("w_out", experts.w_out)
        for name in ("b_in", "b_out"):
            bias = getattr(experts, name)
            self.register_buffer(name, None if bias is None else bias.detach().clone())

    def __len__(self) -> int:
        return self.num_experts

    def act(self, h: Tensor) -> Tensor:
        """Same activation as the source bank."""
        return StackedExperts.act(self, h)  # type: ignore[arg-type]

    def dequantized(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The float ``(w_in [E, F_in, D], w_out [E, D, F])`` this module computes with."""
        return self.dequantize("w_in", dtype), self.dequantize("w_out", dtype)

    def forward(self, x_sorted: Tensor, counts: Tensor, positions: Tensor | None = None) -> Tensor:
        """``x_sorted [N, D]`` grouped by expert, ``counts [E]`` -> ``[N, D]``."""
        return self.grouped_forward(x_sorted, counts)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, ffn_dim={self.ffn_dim}, int{self.bits}"


class Int8StackedExperts(QuantizedStackedExperts):
    """:class:`QuantizedStackedExperts` with int8 weights (one scale per output row)."""

    def __init__(self, experts: StackedExperts) -> None:
        super().__init__(experts, bits=8)


class Int4StackedExperts(QuantizedStackedExperts):
    """:class:`QuantizedStackedExperts` with int4 weights (groups of ``group_size`` columns)."""

    def __init__(self, experts: StackedExperts, group_size: int = 128) -> None:
        super().__init__(experts, bits=4, group_size=group_size)


def quantize_experts(
    model: nn.Module, bits: int = 8, *, group_size: int = 128, skip: Iterable[str] = ()
) -> list[str]:
    """Replace, in place, the ``StackedExperts`` of every PiMoE layer by int8 or int4 experts.

    Returns the qualified names of the replaced expert modules; ``ExpertList`` experts are left
    alone (their Linears are ordinary layers for the other passes).
    """
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    skip = tuple(skip)
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, PiMoE) and isinstance(module.experts, StackedExperts):
            path = f"{name}.experts" if name else "experts"
            if not matches(path, skip):
                bank = module.experts
                module.experts = (
                    Int8StackedExperts(bank) if bits == 8 else Int4StackedExperts(bank, group_size)
                )
                replaced.append(path)
    return replaced


def quantize_experts_int8(model: nn.Module, *, skip: Iterable[str] = ()) -> list[str]:
    """:func:`quantize_experts` with ``bits=8``."""
    return quantize_experts(model, 8, skip=skip)


def grouped_ffn_with(
    x: Tensor,
    counts: Tensor | list[int],
    project_in: Callable[[int, Tensor], Tensor],
    project_out: Callable[[int, Tensor], Tensor],
    act: Activation,
    out_features: int,
) -> Tensor:
    """Forward-only grouped FFN whose per-expert projections are functions (quantized weights):
    ``y[rows of e] = project_out(e, act(project_in(e, x[rows of e])))``.

    Args:
        x: ``[N, D]`` rows grouped by expert; counts: ``[E]`` rows per expert.
        project_in: ``(e, [n, D]) -> [n, F_in]``; project_out: ``(e, [n, F]) -> [n, out_features]``.
        act: ``[n, F_in] -> [n, F]``.

    Returns:
        ``[N, out_features]`` in ``x``'s dtype.
    """
    splits = counts if isinstance(counts, list) else [int(n) for n in counts.tolist()]
    out = x.new_empty(x.shape[0], out_features)

    def run(e: int, rows: slice) -> None:
        out[rows] = project_out(e, act(project_in(e, x[rows])))

    per_expert(splits, run)
    return out
