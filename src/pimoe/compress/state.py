"""Compressed state dicts as plain tensors for safetensors, and back.

A compressed model's ``state_dict()`` holds more than float tensors: torch.ao quantized tensors
(int values plus scales, zero points, axis), tuples (a dynamic Linear's ``(weight, bias)``),
dtypes, ``None`` and, for dynamic LSTMs, TorchScript objects. :func:`encode_state` turns it into
``{name: plain tensor}`` plus a JSON description of everything else; :func:`load_encoded` rebuilds
the values and loads them into a model of the same structure, strictly (missing or unexpected
names raise). Tied (shared) tensors are stored once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import Tensor, nn

_LSTM = ".@lstm."  # name infix of a dynamic LSTM's weights (read and set through the module's API)
_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)


def _encode(
    key: str,
    value: Any,
    tensors: dict[str, Tensor],
    kinds: dict[str, Any],
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str],
) -> None:
    if isinstance(value, Tensor) and value.is_quantized:
        info: dict[str, Any] = {
            "kind": "qtensor",
            "dtype": str(value.dtype).removeprefix("torch."),
            "qscheme": str(value.qscheme()).removeprefix("torch."),
        }
        if value.qscheme() in _PER_TENSOR:
            info.update(scale=value.q_scale(), zero_point=value.q_zero_point())
        else:
            info["axis"] = value.q_per_channel_axis()
            tensors[f"{key}.@scales"] = value.q_per_channel_scales().contiguous()
            tensors[f"{key}.@zero_points"] = value.q_per_channel_zero_points().contiguous()
        tensors[key] = value.int_repr().contiguous()
        kinds[key] = info
    elif isinstance(value, Tensor):
        alias = (
            value.untyped_storage().data_ptr(),
            int(value.storage_offset()),
            tuple(value.shape),
            tuple(value.stride()),
        )
        if value.numel() and alias in seen:
            kinds[key] = {"kind": "alias", "of": seen[alias]}
            return
        seen[alias] = key
        tensors[key] = value.detach().clone().contiguous()
    elif isinstance(value, (tuple, list)):
        kinds[key] = {"kind": "tuple", "len": len(value)}
        for i, item in enumerate(value):
            _encode(f"{key}.{i}", item, tensors, kinds, seen)
    elif value is None:
        kinds[key] = {"kind": "none"}
    elif isinstance(value, torch.dtype):
        kinds[key] = {"kind": "dtype", "value": str(value).removeprefix("torch.")}
    elif isinstance(value, (bool, int, float, str)):
        kinds[key] = {"kind": "value", "value": value}
    else:
        raise ValueError(f"cannot save state entry {key!r} of type {type(value).__name__}")


def encode_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, description)`` of ``model.state_dict()``; the description is JSON-serializable."""
    lstms = [name for name, module in model.named_modules() if isinstance(module, nnqd.LSTM)]
    tensors: dict[str, Tensor] = {}
    kinds: dict[str, Any] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    keys = [k for k in model.state_dict() if not any(k.startswith(f"{name}.") for name in lstms)]
    state = model.state_dict()
    for key in keys:
        _encode(key, state[key], tensors, kinds, seen)
    for name in lstms:
        lstm: Any = model.get_submodule(name)
        weights = lstm._weight_bias()
        for group in ("weight", "bias"):
            for param, value in weights[group].items():
                _encode(f"{name}{_LSTM}{param}", value, tensors, kinds, seen)
    return tensors, {"keys": keys, "lstms": lstms, "kinds": kinds}


def _decode(
    key: str, tensors: dict[str, Tensor], kinds: dict[str, Any], out: dict[str, Any]
) -> Any:
    info = kinds.get(key)
    if info is None:
        if key not in tensors:
            raise ValueError(f"state entry {key!r} is missing from the file")
        return tensors[key]
    kind = info.get("kind")
    if (
        kind == "qtensor"
    ):  # the integer tensor's dtype (int8 / uint8 / int32) gives the quantized dtype
        values = tensors[key]
        if "axis" in info:
            return torch._make_per_channel_quantized_tensor(
                values, tensors[f"{key}.@scales"], tensors[f"{key}.@zero_points"], int(info["axis"])
            )
        return torch._make_per_tensor_quantized_tensor(
            values, float(info["scale"]), int(info["zero_point"])
        )
    if kind == "alias":
        return out[info["of"]] if info["of"] in out else _decode(info["of"], tensors, kinds, out)
    if kind == "tuple":
        return tuple(_decode(f"{key}.{i}", tensors, kinds, out) for i in range(int(info["len"])))
    if kind == "none":
        return None
    if kind == "dtype":
        return getattr(torch, str(info["value"]))
    if kind == "value":
        return info["value"]
    raise ValueError(f"state entry {key!r} has an unknown kind {kind!r}")


def load_encoded(model: nn.Module, tensors: dict[str, Tensor], description: dict[str, Any]) -> None:
    """Load what :func:`encode_state` wrote into ``model`` (same structure), strictly.

    Raises:
        ValueError: a missing, unexpected or ill-fitting entry (the message names it).
    """
    try:
        keys, lstms, kinds = (
            list(description["keys"]),
            list(description["lstms"]),
            dict(description["kinds"]),
        )
        state: dict[str, Any] = {}
        for key in keys:
            state[key] = _decode(str(key), tensors, kinds, state)
    except (KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise ValueError(
            f"the state description does not fit the tensors ({type(error).__name__}: {error})"
        ) from error
    model_lstms = [name for name, module in model.named_modules() if isinstance(module, nnqd.LSTM)]
    if sorted(model_lstms) != sorted(lstms):
        raise ValueError(f"dynamic LSTM modules differ: file {lstms}, model {model_lstms}")
    for (
        name
    ) in lstms:  # set through the module's API, then its own (TorchScript) entries join the state
        prefix = f"{name}{_LSTM}"
        weights = {
            k[len(prefix) :]: _decode(k, tensors, kinds, state)
            for k in list(tensors) + list(kinds)
            if k.startswith(prefix) and not k.endswith(("@scales", "@zero_points"))
        }
        lstm: Any = model.get_submodule(name)
        try:
            lstm.set_weight_bias(weights)
        except (KeyError, RuntimeError) as error:
            raise ValueError(f"{name}: the LSTM weights do not fit ({error})") from error
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(f"{name}.")})
    ordered: Any = OrderedDict(state)
    ordered._metadata = getattr(
        model.state_dict(), "_metadata", None
    )  # module versions pick the format
    try:
        model.load_state_dict(ordered, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ValueError(f"the weights do not fit the model ({error})") from error
