"""Module-tree helpers shared by the compression passes: find replaceable Linears, swap modules."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator

from torch import nn

from pimoe.moe.router import Router


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the qualified module ``name`` matches one of the ``fnmatch`` ``patterns``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter that is registered in more than one place (tied weights)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def plain_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """``(qualified name, module)`` of every replaceable ``nn.Linear`` of ``model``.

    Excluded on purpose:
    - subclasses of ``nn.Linear``: ``nn.MultiheadAttention.out_proj`` is a
      ``NonDynamicallyQuantizableLinear`` whose weight the attention reads directly, so replacing
      it by another module would be silently ignored;
    - the gate of a :class:`pimoe.moe.Router`: ``PiMoE`` reads ``router.gate.weight`` (dtype
      checks, expert dropping/merging), and the router is small and sensitive to rounding.
    """
    if type(model) is nn.Linear:
        raise ValueError("pass the module that contains the Linear layers, not a bare nn.Linear")
    gates = {id(module.gate) for module in model.modules() if isinstance(module, Router)}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and id(module) not in gates:
            yield name, module


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at the qualified ``name`` (e.g. ``"blocks.0.mlp.up"``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def float_weight_modules(model: nn.Module) -> list[str]:
    """``"name (Type)"`` of every module that directly holds a floating-point parameter of 2+ dims.

    After quantization these are the layers left in float (unsupported types, skipped names, tied
    weights), which the compression report lists.
    """
    found = []
    for name, module in model.named_modules():
        if any(p.is_floating_point() and p.dim() >= 2 for p in module.parameters(recurse=False)):
            found.append(f"{name or '(root)'} ({type(module).__name__})")
    return found
