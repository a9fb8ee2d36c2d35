"""Weight-only quantization in pure torch: int8 per output channel, int4 per group of inputs.

- :class:`Int8WeightOnlyLinear` / :func:`quantize_weight_only_int8`: symmetric per-output-channel
  int8 weights plus floating-point scales, dequantized in ``forward`` (any device, any float
  dtype). The int8 tensor is a buffer, so the state dict (and a saved file) holds 1 byte per
  weight instead of 4.
- :class:`Int4WeightOnlyLinear` / :func:`quantize_weight_only_int4`: 4-bit weights packed two per
  byte with one scale per group of inputs (torchao's int4 weight-only path does not run on CPU in
  torchao 0.18, and its ``IntxWeightOnly`` int4 stores one byte per value); :func:`pack_int4` /
  :func:`unpack_int4` are the nibble packing, shared with the int4 embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.compress._modules import matches, plain_linears, set_module, tied_parameter_ids


def _frozen_bias(size: int, dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(size, dtype=dtype, device=device), requires_grad=False)


class Int8WeightOnlyLinear(nn.Module):
    """Linear layer with int8 weights and one floating-point scale per output channel.

    ``weight ~= weight_int8 * scale[:, None]`` with ``weight_int8`` in ``[-127, 127]`` (symmetric,
    no zero point). ``forward`` dequantizes to the input's dtype and calls ``F.linear``: this saves
    memory and file size, not compute.

    Buffers/parameters: ``weight_int8 [out, in]`` int8, ``scale [out]`` float, ``bias [out]``.
    """

    weight_int8: Tensor
    scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = _frozen_bias(out_features, dtype, device) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Quantize ``linear``'s weight per output channel (round to nearest)."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            weight.device,
            weight.dtype,
        )
        wide = weight.float()
        scale = wide.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # [out]
        with torch.no_grad():
            module.weight_int8.copy_(
                (wide / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            )
            module.scale.copy_(scale.to(weight.dtype))
            if linear.bias is not None and module.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The ``[out, in]`` float weight this layer computes with."""
        dtype = dtype or self.scale.dtype
        return self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_weight_only_int8(model: nn.Module, *, skip: Iterable[str] = ()) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` by :class:`Int8WeightOnlyLinear`.

    Skipped: modules whose qualified name matches ``skip`` (``fnmatch`` patterns), Linears whose
    weight is tied to another module, and ``nn.Linear`` subclasses (e.g. the output projection
    inside ``nn.MultiheadAttention``, which reads its weight directly).

    Returns:
        the qualified names of the replaced layers.

    Saving and loading: ``torch.save(model.state_dict())`` stores the int8 tensors. To load, build
    the float model, apply this function with the same ``skip`` (this fixes the module structure),
    then ``load_state_dict``; :func:`load_weight_only_int8` does the last two steps.
    """
    skip = tuple(skip)
    tied = tied_parameter_ids(model)
    replaced = []
    for name, linear in list(plain_linears(model)):
        if matches(name, skip) or id(linear.weight) in tied:
            continue
        set_module(model, name, Int8WeightOnlyLinear.from_linear(linear))
        replaced.append(name)
    return replaced


def load_weight_only_int8(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, skip: Iterable[str] = ()
) -> nn.Module:
    """Load a state dict saved from a :func:`quantize_weight_only_int8` model.

    ``model`` is a freshly built float model of the same architecture; it is converted in place
    with the same ``skip`` and then loaded strictly (missing or unexpected keys raise).
    """
    quantize_weight_only_int8(model, skip=skip)
    model.load_state_dict(state_dict, strict=True)
    return model


class Int4WeightOnlyLinear(nn.Module):
    """Linear layer with packed 4-bit weights and one floating-point scale per group of inputs.

    Each row is split into groups of ``group_size`` consecutive inputs; a group's weights are
    stored as ``round(w / scale)`` in ``[-7, 7]`` with ``scale = max|w| / 7`` (symmetric), offset
    by 8 and packed two per byte (even input index in the low nibble). ``forward`` unpacks and
    dequantizes to the input's dtype, then calls ``F.linear``: it saves memory, not compute.

    Buffers/parameters: ``weight_packed [out, in / 2]`` uint8, ``scales [out, in / group_size]``
    float, ``bias [out]``. Requires ``in_features`` divisible by ``group_size`` (even).
    """

    weight_packed: Tensor
    scales: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if group_size < 2 or group_size % 2 or in_features % group_size:
            raise ValueError(
                f"group_size must be even, >= 2 and divide in_features={in_features}, got {group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "weight_packed",
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "scales",
            torch.ones(out_features, in_features // group_size, dtype=dtype, device=device),
        )
        self.bias = _frozen_bias(out_features, dtype, device) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4WeightOnlyLinear:
        """Quantize ``linear``'s weight group-wise (round to nearest) and pack it."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size,
            weight.device,
            weight.dtype,
        )
        groups = weight.float().reshape(linear.out_features, -1, group_size)  # [out, G, g]
        scales = (
            groups.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / 7.0
        )  # [out, G]
        codes = (groups / scales[..., None]).round().clamp(-7, 7).to(torch.int16) + 8  # in [1, 15]
        with torch.no_grad():
            module.weight_packed.copy_(pack_int4(codes.reshape(linear.out_features, -1)))
            module.scales.copy_(scales.to(weight.dtype))
            if linear.bias is not None and module.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The ``[out, in]`` float weight this layer computes with."""
        dtype = dtype or self.scales.dtype
        codes = unpack_int4(self.weight_packed).to(dtype) - 8  # [out, in]
        groups = (
            codes.reshape(self.out_features, -1, self.group_size) * self.scales.to(dtype)[..., None]
        )
        return groups.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def pack_int4(codes: Tensor) -> Tensor:
    """Pack ``[..., 2n]`` integers in ``[0, 15]`` into ``[..., n]`` uint8 (even index = low nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    pairs = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: ``[..., n]`` uint8 -> ``[..., 2n]`` uint8 in ``[0, 15]``."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def quantize_weight_only_int4(
    model: nn.Module, *, group_size: int = 32, skip: Iterable[str] = ()
) -> list[str]:
    """Replace, in place, the ``nn.Linear`` layers of ``model`` by :class:`Int4WeightOnlyLinear`.

    Same selection as :func:`quantize_weight_only_int8`; layers whose ``in_features`` is not a
    multiple of ``group_size`` are also left in float. Returns the replaced layers' names. Load a
    saved state dict with :func:`load_weight_only_int4` and the same arguments.
    """
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be even and >= 2, got {group_size}")
    skip = tuple(skip)
    tied = tied_parameter_ids(model)
    replaced = []
    for name, linear in list(plain_linears(model)):
        if matches(name, skip) or id(linear.weight) in tied or linear.in_features % group_size:
            continue
        set_module(model, name, Int4WeightOnlyLinear.from_linear(linear, group_size))
        replaced.append(name)
    return replaced


def load_weight_only_int4(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    group_size: int = 32,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Load a state dict saved from a :func:`quantize_weight_only_int4` model into a freshly
    built float ``model`` of the same architecture (converted in place, loaded strictly)."""
    quantize_weight_only_int4(model, group_size=group_size, skip=skip)
    model.load_state_dict(state_dict, strict=True)
    return model
