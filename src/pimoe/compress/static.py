"""Static int8 quantization with calibration: torch.ao FX graph mode on the x86 (fbgemm) backend.

Dynamic int8 (:func:`~pimoe.compress.quantize.quantize_dynamic_int8`) measures each batch's
activation range at run time; static int8 fixes every activation's scale and zero point once,
from calibration batches, so the whole graph (Linear, Conv2d, ReLU, adds) runs on int8 tensors
with no per-call range computation. It needs a model that ``torch.fx`` can trace (no
data-dependent Python control flow): plain MLPs and CNNs qualify; models with routing decided
in Python (a PiMoE layer's sort by expert) or HF models with dynamic shapes usually do not, and
get a ``ValueError`` that says so; use dynamic int8 for them.

Saving: quantized tensors do not go into safetensors; :func:`save_static_int8` writes the state
dict with ``torch.save`` (read back with ``weights_only=True``) and :func:`load_static_int8`
rebuilds the same graph from the float model and loads it.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pimoe.compress.distill import Batch, call_model
from pimoe.io import atomic_write_bytes


def _convert(
    model: nn.Module, example_inputs: Batch, calibration: Iterable[Batch] | None, backend: str
) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # torch.ao's deprecation notices and "observer not run" on rebuilds
        try:
            args = (
                tuple(example_inputs)
                if isinstance(example_inputs, (tuple, list))
                else (example_inputs,)
            )
            prepared = prepare_fx(float_model, get_default_qconfig_mapping(backend), args)
        except (
            Exception
        ) as exc:  # torch.fx raises TraceError, TypeError, RuntimeError... on untraceable code
            raise ValueError(
                f"static int8 needs a model torch.fx can trace; {type(model).__name__} is not "
                f"({type(exc).__name__}: {exc}). Use dynamic int8 (quantize_dynamic_int8) instead."
            ) from exc
        if calibration is not None:
            batches = 0
            with torch.no_grad():
                for batch in calibration:
                    call_model(prepared, batch)
                    batches += 1
            if batches == 0:
                raise ValueError(
                    "calibration is empty: static int8 needs at least one batch to fix activation ranges"
                )
        return convert_fx(prepared)


def quantize_static_int8(
    model: nn.Module, example_inputs: Batch, calibration: Iterable[Batch], backend: str = "x86"
) -> nn.Module:
    """A new int8 model (``model`` is unchanged) whose activation scales come from ``calibration``.

    Args:
        model: a float model ``torch.fx`` can trace (e.g. ``Linear``/``Conv2d``/``ReLU`` stacks).
        example_inputs: one batch (a tensor or a tuple of positional arguments) to trace with.
        calibration: batches run through the observed model to record activation ranges
            (representative data, not the evaluation set).
        backend: torch.ao's qconfig backend: "x86" (default) or "fbgemm"/"qnnpack".

    Returns:
        a ``torch.fx.GraphModule`` with quantized ``Linear``/``Conv2d`` modules, in eval mode.
    """
    return _convert(model, example_inputs, calibration, backend)


def save_static_int8(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write a static int8 model's state dict (quantized tensors included) atomically."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_static_int8(
    model: nn.Module, example_inputs: Batch, path: str | os.PathLike[str], backend: str = "x86"
) -> nn.Module:
    """Rebuild the static int8 graph of the float ``model`` (same architecture as when it was
    saved) and load the scales and int8 weights saved by :func:`save_static_int8`."""
    try:
        state: dict[str, Any] = torch.load(path, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path} is not a static int8 state dict written by save_static_int8 ({exc})"
        ) from exc
    quantized = _convert(model, example_inputs, None, backend)
    try:
        quantized.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(
            f"{path} does not fit the int8 graph of {type(model).__name__}: {exc}"
        ) from exc
    return quantized


__all__ = ["load_static_int8", "quantize_static_int8", "save_static_int8"]
