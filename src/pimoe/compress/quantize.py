"""Quantization: dynamic int8 (torch.ao), fp16/bf16 casts, int8 word embeddings; the pure-torch
weight-only int8/int4 linears live in :mod:`pimoe.compress.weight_only` (re-exported here).

- :func:`quantize_dynamic_int8`: ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear``
  (per-channel or per-tensor weights) and ``nn.LSTM``. Weights are stored in int8 and
  activations are quantized on the fly; it runs on CPU only (fbgemm / qnnpack kernels).
  torch.ao eager quantization is deprecated upstream in favour of torchao; its deprecation
  warnings are silenced inside these calls. ``full_range=True`` gives 8-bit activations and
  7-bit weights (:class:`FullRangeDynamicLinear`).
- :func:`cast`: the whole model to float16 / bfloat16 (or back to float32).
- :func:`quantize_embedding_int8`: named ``nn.Embedding`` modules to torch.ao's quantized
  embedding (8-bit, per-row float scale and zero point). Apply it to word embeddings only: on
  all-MiniLM-L6-v2 torch.ao failed on the token-type embedding (``docs/compress.md``).
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import Tensor, nn

from pimoe.compress._modules import matches, plain_linears, set_module, tied_parameter_ids
from pimoe.compress.weight_only import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    load_weight_only_int4,
    load_weight_only_int8,
    pack_int4,
    quantize_weight_only_int4,
    quantize_weight_only_int8,
    unpack_int4,
)

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


__all__ = [
    "FullRangeDynamicLinear",
    "Int4WeightOnlyLinear",
    "Int8WeightOnlyLinear",
    "cast",
    "load_weight_only_int4",
    "load_weight_only_int8",
    "pack_int4",
    "quantize_dynamic_int8",
    "quantize_embedding_int8",
    "quantize_weight_only_int4",
    "quantize_weight_only_int8",
    "quiet_torch_ao",
    "saved_bytes",
    "unpack_int4",
]
