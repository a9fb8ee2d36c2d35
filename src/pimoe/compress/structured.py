"""Whole-model structured steps of :class:`~pimoe.compress.ArchitectureOptimizer`: FFN neurons,
attention heads, and the experts of every PiMoE layer.

Every decision is a function of the weights only (neuron / head / expert weight norms, router-row
similarity), so a saved model's structure is rebuilt from its source model (see
:mod:`pimoe.compress.saved`). Each function works in place and returns ``(changed, skipped)``
lists of ``"name: what"`` strings for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from pimoe.compress._modules import matches, set_module
from pimoe.compress.heads import prune_attention_heads
from pimoe.compress.moe import drop_experts, merge_similar_experts
from pimoe.compress.prune import prune_ffn_neurons
from pimoe.moe.experts import FFN, StackedExperts, SwiGLU
from pimoe.moe.layer import PiMoE

Changes = tuple[list[str], list[str]]


def _ffn_pairs(
    model: nn.Module, skip: tuple[str, ...]
) -> Iterable[tuple[str, nn.Module, str, str, bool]]:
    """``(name, owner, up attribute path, down attribute path, gated)`` of each dense FFN."""
    for name, module in list(model.named_modules()):
        if matches(name, skip):
            continue
        if type(module) is FFN:
            yield name, module, "up", "down", False
        elif type(module) is SwiGLU:
            yield name, module, "gate_up", "down", True
        elif (
            type(getattr(getattr(module, "intermediate", None), "dense", None)) is nn.Linear
            and type(getattr(getattr(module, "output", None), "dense", None)) is nn.Linear
            and module.intermediate.dense.out_features == module.output.dense.in_features
        ):
            yield (
                name,
                module,
                "intermediate.dense",
                "output.dense",
                False,
            )  # Hugging Face BERT layer


def prune_neurons(model: nn.Module, amount: float, skip: Iterable[str] = ()) -> Changes:
    """:func:`~pimoe.compress.prune.prune_ffn_neurons` on every dense FFN (pimoe ``FFN`` /
    ``SwiGLU``, Hugging Face BERT ``intermediate``/``output``); expert FFNs are not touched."""
    changed = []
    for name, owner, up_path, down_path, gated in _ffn_pairs(model, tuple(skip)):
        up, down = owner.get_submodule(up_path), owner.get_submodule(down_path)
        assert isinstance(up, nn.Linear) and isinstance(
            down, nn.Linear
        )  # _ffn_pairs checked their types
        new_up, new_down = prune_ffn_neurons(up, down, amount, gated=gated)
        set_module(owner, up_path, new_up)
        set_module(owner, down_path, new_down)
        changed.append(f"{name}: {down.in_features} -> {new_down.in_features} neurons")
    return changed, []


def _resize_moe_layers(
    model: nn.Module, skip: Iterable[str], resize: Callable[[PiMoE], PiMoE | str]
) -> Changes:
    """Replace every PiMoE layer (``StackedExperts``, token-choice routing) by ``resize(layer)``;
    a string from ``resize`` is the reason a layer stays as it is."""
    changed, skipped = [], []
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, PiMoE) or matches(name, tuple(skip)):
            continue
        if not isinstance(layer.experts, StackedExperts) or layer.router.routing != "token_choice":
            skipped.append(f"{name}: needs StackedExperts and token-choice routing")
            continue
        new = resize(layer)
        if isinstance(new, str):
            skipped.append(f"{name}: {new}")
            continue
        set_module(model, name, new)
        changed.append(f"{name}: {layer.num_experts} -> {new.num_experts} experts")
    return changed, skipped


def drop_experts_everywhere(model: nn.Module, amount: float, skip: Iterable[str] = ()) -> Changes:
    """Drop the ``round(amount * E)`` experts with the smallest weight norm in every PiMoE layer
    (``StackedExperts``, token-choice routing); other layers are skipped and listed."""
    return _resize_moe_layers(
        model, skip, lambda layer: drop_experts(layer, amount=amount, by="weight_norm")
    )


def merge_experts_everywhere(
    model: nn.Module, num_experts_after: int, skip: Iterable[str] = ()
) -> Changes:
    """Merge every PiMoE layer's experts down to ``num_experts_after`` by router-row similarity."""
    return _resize_moe_layers(
        model,
        skip,
        lambda layer: (
            f"already {layer.num_experts} experts"
            if layer.num_experts <= num_experts_after
            else merge_similar_experts(layer, num_experts_after, by="router")
        ),
    )


def prune_attention_heads_noted(
    model: nn.Module, amount: float, skip: Iterable[str] = ()
) -> Changes:
    """:func:`~pimoe.compress.heads.prune_attention_heads` with the report's notes."""
    kept = prune_attention_heads(model, amount, skip=skip)
    return [f"{name}: heads {heads} kept" for name, heads in kept.items()], []
