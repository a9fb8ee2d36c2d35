"""Quantization: dynamic int8 (torch.ao), weight-only int8 (pure torch), fp16/bf16 casts,
int8 word embeddings.

- :func:`quantize_dynamic_int8`: ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``
  (per-channel or per-tensor weights) and ``nn.LSTM``. Weights are stored in int8 and
  activations are quantized on the fly; it runs on CPU only (fbgemm / qnnpack kernels).
  torch.ao eager quantization is deprecated upstream in favour of torchao; its deprecation
  warnings are silenced inside these calls. ``full_range=True`` gives 8-bit activations and
  7-bit weights (:class:`FullRangeDynamicLinear`).
- :class:`Int8WeightOnlyLinear` / :func:`quantize_weight_only_int8`: symmetric per-output-channel
  int8 weights plus floating-point scales, dequantized in ``forward`` (any device, any float
  dtype). The int8 tensor is a buffer, so the state dict (and a saved file) holds 1 byte per
  weight instead of 4.
- :func:`cast`: the whole model to float16 / bfloat16 (or back to float32).
- :func:`quantize_embedding_int8`: named ``nn.Embedding`` modules to torch.ao's quantized
  embedding (8-bit, per-row float scale and zero point). Apply it to word embeddings only: on
  all-MiniLM-L6-v2 torch.ao failed on the token-type embedding (``docs/compress.md``).

- :class:`Int4WeightOnlyLinear` / :func:`quantize_weight_only_int4`: 4-bit weights packed two per
  byte with one scale per group of inputs, in pure torch (torchao's int4 weight-only path does not
  run on CPU in torchao 0.18, and its ``IntxWeightOnly`` int4 stores one byte per value).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.compress._modules import matches, plain_linears, set_module, tied_parameter_ids

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """Silence torch.ao's deprecation warnings (the API still works in torch 2.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*", category=UserWarning)
        yield


def quantize_dynamic_int8(
    model: nn.Module,
    per_channel: bool = True,
    *,
    lstm: bool = True,
    skip: Iterable[str] = (),
    inplace: bool = False,
    full_range: bool = False,
) -> nn.Module:
    """Dynamic int8 quantization of ``nn.Linear`` (and ``nn.LSTM`` when ``lstm``) layers.

    The Linears chosen are those of :func:`pimoe.compress._modules.plain_linears` (no subclasses,
    no PiMoE router gates) whose weight is not tied to another module and whose qualified name
    does not match ``skip`` (``fnmatch`` patterns).

    Args:
        model: a float32 model on CPU.
        per_channel: one weight scale per output channel of each Linear (more accurate) instead
            of one per tensor. LSTMs always use per-tensor weights.
        lstm: also quantize ``nn.LSTM`` modules.
        skip: qualified names to leave in float (e.g. layers with activation outliers).
        inplace: modify ``model`` instead of a deep copy.
        full_range: quantize activations to all 8 bits (:class:`FullRangeDynamicLinear`) instead
            of torch.ao's 7, and weights to 7 bits (``[-64, 63]``) instead of 8, so fbgemm's
            saturating int16 pair sums still cannot overflow. Activations, quantized per tensor
            on the fly, are the larger error: on all-MiniLM-L6-v2 the mean cosine rose from 0.978
            to 0.993, on the test MLP the relative error fell from 0.022 to 0.016.

    Returns:
        the quantized model (CPU inference only; not trainable).
    """
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    skip = tuple(skip)
    tied = tied_parameter_ids(model)
    linear_qconfig = (
        _full_range_qconfig(per_channel)
        if full_range
        else (per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig)
    )
    spec: dict[str, object] = {
        name: linear_qconfig
        for name, linear in plain_linears(model)
        if not matches(name, skip) and id(linear.weight) not in tied
    }
    if lstm:
        spec.update(
            {
                name: default_dynamic_qconfig
                for name, module in model.named_modules()
                if type(module) is nn.LSTM and not matches(name, skip)
            }
        )
    with quiet_torch_ao():
        quantized: nn.Module = quantize_dynamic(model, spec, dtype=torch.qint8, inplace=inplace)  # type: ignore[no-untyped-call]
    if full_range:
        for module in quantized.modules():
            if type(module) is nnqd.Linear:
                module.__class__ = FullRangeDynamicLinear
    return quantized


def _full_range_qconfig(per_channel: bool) -> object:
    """8-bit dynamic activations and symmetric 7-bit weights (``[-64, 63]``)."""
    from torch.ao.quantization import (
        MinMaxObserver,
        PerChannelMinMaxObserver,
        PlaceholderObserver,
        QConfig,
    )

    observer, scheme = (
        (PerChannelMinMaxObserver, torch.per_channel_symmetric)
        if per_channel
        else (MinMaxObserver, torch.per_tensor_symmetric)
    )
    return QConfig(  # type: ignore[no-untyped-call]
        activation=PlaceholderObserver.with_args(
            dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True
        ),
        weight=observer.with_args(dtype=torch.qint8, qscheme=scheme, quant_min=-64, quant_max=63),
    )


class FullRangeDynamicLinear(nnqd.Linear):
    """torch.ao dynamic int8 Linear with 8-bit activations (built with 7-bit weights).

    torch.ao's ``Linear`` calls ``quantized.linear_dynamic(..., reduce_range=True)``: 7-bit
    activations, because on CPUs without VNNI fbgemm multiplies uint8 activations by int8 weights
    into saturating int16 pair sums (``2 * 255 * 127 > 32767``). Here the activations keep all 8 bits
    and :func:`quantize_dynamic_int8` gives the weights 7 (``2 * 255 * 64 <= 32767``). Same state
    dict as ``torch.ao.nn.quantized.dynamic.Linear``; do not load 8-bit weights into it.
    """

    def forward(self, x: Tensor) -> Tensor:
        packed = self._packed_params._packed_params
        out: Tensor = torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False)
        return out.to(x.dtype)


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


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast all floating-point parameters and buffers of ``model`` to ``dtype``, in place.

    ``dtype`` is ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``. Inputs must be cast
    too (or run under ``torch.autocast``); on CPU, bfloat16 is the better supported half type.
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    return model.to(dtype)


def quantize_embedding_int8(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Replace the named ``nn.Embedding`` modules of ``model`` by torch.ao quantized embeddings.

    Weights become 8-bit with a float scale and zero point per row (``quint8``,
    ``per_channel_affine_float_qparams``); lookups return float32. CPU only.

    Args:
        model: the model, modified in place (also returned).
        names: qualified module names, e.g. ``["embeddings.word_embeddings"]`` for BERT-style
            models. Only word embeddings: see the module docstring.

    Raises:
        ValueError: no names, or a name that is not an ``nn.Embedding`` (or does not exist).
    """
    import torch.ao.nn.quantized as nnq
    from torch.ao.quantization import float_qparams_weight_only_qconfig

    if not names:
        raise ValueError("give the qualified names of the embeddings to quantize")
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"no submodule named {name!r}") from error
        if type(module) is not nn.Embedding:
            raise ValueError(f"{name!r} is a {type(module).__name__}, not an nn.Embedding")
        float_module = copy.copy(module)
        float_module.qconfig = float_qparams_weight_only_qconfig  # type: ignore[assignment]
        with quiet_torch_ao():
            set_module(model, name, nnq.Embedding.from_float(float_module))  # type: ignore[no-untyped-call]
    return model


def saved_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict())`` (serialized in memory)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
