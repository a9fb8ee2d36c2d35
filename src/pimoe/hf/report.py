"""Routing report of any MoE model: tokens per expert, dead experts, imbalance, entropy, loss.

One forward pass with forward hooks, whatever ``config.output_router_logits`` says (with it off,
transformers computes no load-balancing loss at all):

- transformers models: the router modules named by the model's ``_can_record_outputs
  ["router_logits"]`` (what ``output_router_logits`` records) give the logits, and the experts
  modules (``@use_experts_implementation``) give the executed ``top_k_index``. Models whose
  experts do not go through that interface get the top-k of their router probabilities, and the
  report says so (``counts_from="router_top_k"``).
- pimoe models: every ``PiMoE`` (or expert-parallel) layer's ``last_stats`` and ``aux_loss``.

Entropy and the loss use the router's distribution over experts: ``softmax(router logits)``
(the distribution transformers' ``load_balancing_loss_func`` uses for every family; for
sigmoid-scored routers such as DeepSeek-V3 it is not the per-expert score), or the recorded rows
themselves when they already are probabilities.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pimoe.moe.layer import MoEOutput
from pimoe.moe.losses import load_balancing_loss
from pimoe.moe.stats import RoutingStats

_COLUMNS = ("layer", "tokens", "dead", "imbalance", "entropy", "aux loss")


@dataclass
class LayerRouting:
    """One MoE layer's routing on the report's inputs.

    Attributes:
        name: the MoE block's module path (e.g. ``model.layers.3.mlp``).
        stats: counts, entropy, imbalance (:class:`~pimoe.moe.stats.RoutingStats`).
        top_k: experts per token.
        aux_loss: Switch load-balancing loss of this layer, ``E * sum_e f_e * P_e`` with ``f_e``
            the share of the ``T*k`` assignments (1.0 = uniform; transformers' normalization is
            ``top_k`` times this).
        counts_from: ``"executed"`` (what the experts ran) or ``"router_top_k"``.
    """

    name: str
    stats: RoutingStats
    top_k: int
    aux_loss: float
    counts_from: str = "executed"


@dataclass
class RoutingReport:
    """Per-layer routing of one forward pass; ``print(report)`` shows a table.

    Attributes:
        layers: one :class:`LayerRouting` per MoE layer, in call order.
        hf_aux_loss: transformers' ``load_balancing_loss_func`` over all layers (assignments and
            probabilities pooled over layers, the value ``router_aux_loss_coef`` multiplies), or
            None where the layers differ in experts or top-k, or for pimoe layers.
    """

    layers: list[LayerRouting]
    hf_aux_loss: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python report (JSON-serializable)."""
        return {
            "hf_aux_loss": self.hf_aux_loss,
            "layers": [
                {
                    "name": layer.name,
                    "top_k": layer.top_k,
                    "aux_loss": layer.aux_loss,
                    "counts_from": layer.counts_from,
                    **layer.stats.as_dict(),
                }
                for layer in self.layers
            ],
        }

    def table(self) -> Any:
        """A ``rich.table.Table`` with one row per layer."""
        from pimoe.tables import Table

        table = Table(title="MoE routing per layer")
        for column in _COLUMNS:
            table.add_column(column, justify="left" if column == "layer" else "right")
        for layer in self.layers:
            s = layer.stats
            table.add_row(
                layer.name,
                str(s.num_tokens),
                f"{len(s.dead_experts)}/{s.num_experts}",
                f"{s.imbalance:.2f}",
                f"{s.entropy:.3f}",
                f"{layer.aux_loss:.4f}",
            )
        if self.hf_aux_loss is not None:
            table.caption = (
                f"transformers load_balancing_loss_func over all layers: {self.hf_aux_loss:.4f}"
            )
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(file=io.StringIO(), width=120, force_terminal=False)
        console.print(self.table())
        return console.file.getvalue()  # type: ignore[attr-defined]

    def save_heatmap(self, path: str | os.PathLike[str]) -> None:
        """PNG heatmap of each layer's token share per expert (layers x experts)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        from pimoe.io import save_png

        if not self.layers:
            raise ValueError("the report has no MoE layer to plot")
        width = max(layer.stats.num_experts for layer in self.layers)
        share = np.full((len(self.layers), width), np.nan)
        for row, layer in enumerate(self.layers):
            share[row, : layer.stats.num_experts] = layer.stats.load
        fig, ax = plt.subplots(figsize=(min(2 + 0.25 * width, 16), 1.5 + 0.35 * len(self.layers)))
        image = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(self.layers)), [layer.name for layer in self.layers], fontsize=7)
        ax.set_title("token share per expert (1/E = balanced)")
        fig.colorbar(image, ax=ax, label="share of assignments")
        save_png(fig, path, bbox_inches="tight")


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _as_probs(rows: Tensor) -> Tensor:
    """``[T, E]`` router output -> probabilities: softmax of logits, or the rows themselves
    when they already are a distribution."""
    rows = rows.detach().float()
    if (
        rows.numel()
        and bool((rows >= 0).all())
        and torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-4)
    ):
        return rows
    return rows.softmax(dim=-1)


def _router_recorders(model: nn.Module) -> list[tuple[type, int]]:
    """``(router class, output index)`` pairs from the models' ``_can_record_outputs``."""
    found = []
    for module in model.modules():
        recorder = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None and hasattr(recorder, "target_class"):
            found.append((recorder.target_class, int(recorder.index or 0)))
    return list(dict.fromkeys(found))


def _is_hf_experts(module: nn.Module) -> bool:
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "num_experts")
        and hasattr(module, "down_proj")
    )


def _top_k_index(args: tuple, kwargs: dict) -> Tensor:
    if len(args) >= 2:
        return args[1]
    for key in ("top_k_index", "router_indices", "topk_indices"):
        if key in kwargs:
            return kwargs[key]
    raise TypeError(f"cannot find the top-k indices among the experts' arguments {list(kwargs)}")


def _run(model: nn.Module, inputs: Any) -> None:
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            model(*inputs)
        else:
            model(inputs)


def _token_mask(inputs: Any) -> Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return None if mask is None else mask.reshape(-1).bool()


def _pimoe_report(model: nn.Module, layers: dict[str, Any], inputs: Any) -> RoutingReport:
    stats: dict[str, list[tuple[RoutingStats, float]]] = {name: [] for name in layers}

    def hook(name: str):
        def record(module: Any, args: Any, output: Any) -> None:
            if module.last_stats is not None:
                stats[name].append((module.last_stats, float(module.aux_loss)))

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    result = []
    for name, calls in stats.items():
        if calls:
            merged = RoutingStats.merge([s for s, _ in calls])
            loss = sum(s.num_tokens * a for s, a in calls) / max(merged.num_tokens, 1)
            result.append(LayerRouting(name, merged, int(layers[name].top_k), loss))
    return RoutingReport(result)


def routing_report(model: nn.Module, inputs: Any) -> RoutingReport:
    """Run ``model`` once on ``inputs`` (no gradients) and report its routing per MoE layer.

    Args:
        model: a transformers MoE model (any family that records ``router_logits``), or a model
            whose MoE layers are pimoe ``PiMoE`` layers.
        inputs: keyword arguments (e.g. a tokenizer's output; for transformers models its
            ``attention_mask`` excludes padding from the counts and the losses), positional
            arguments, or one tensor.

    Raises:
        TypeError: the model has no MoE layer this function recognizes.
    """
    pimoe_layers: dict[str, Any] = {
        name: m for name, m in model.named_modules() if isinstance(m, MoEOutput)
    }
    if pimoe_layers:
        return _pimoe_report(model, pimoe_layers, inputs)
    recorders = _router_recorders(model)
    routers = {
        name: index
        for name, m in model.named_modules()
        for cls, index in recorders
        if isinstance(m, cls)
    }
    if not routers:
        raise TypeError(
            f"{type(model).__name__} has no MoE layer pimoe recognizes: no pimoe MoE layer and no "
            "transformers router recorded as 'router_logits'"
        )
    experts = {_parent(name): m for name, m in model.named_modules() if _is_hf_experts(m)}
    logits: dict[str, list[Tensor]] = {}
    indices: dict[str, list[Tensor]] = {}
    modules = dict(model.named_modules())

    def on_router(name: str, index: int):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            out = output[index] if isinstance(output, (tuple, list)) else output
            logits.setdefault(_parent(name), []).append(out.detach().reshape(-1, out.shape[-1]))

        return record

    def on_experts(parent: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            indices.setdefault(parent, []).append(_top_k_index(args, kwargs).detach())

        return record

    handles = [
        modules[name].register_forward_hook(on_router(name, index))
        for name, index in routers.items()
    ]
    handles += [
        m.register_forward_pre_hook(on_experts(p), with_kwargs=True) for p, m in experts.items()
    ]
    try:
        _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return _hf_report(model, logits, indices, _token_mask(inputs))


def _hf_report(
    model: nn.Module,
    logits: dict[str, list[Tensor]],
    indices: dict[str, list[Tensor]],
    token_mask: Tensor | None,
) -> RoutingReport:
    layers: list[LayerRouting] = []
    pooled: list[tuple[Tensor, Tensor]] = []
    for parent, rows in logits.items():
        probs = _as_probs(torch.cat(rows))  # [T, E]
        num_experts = probs.shape[1]
        if parent in indices:
            chosen, counts_from = torch.cat(indices[parent]).long(), "executed"
        else:
            top_k = getattr(model.config, "num_experts_per_tok", None)
            if top_k is None:
                raise TypeError(
                    f"{parent}: no experts module to read the executed experts from, and no num_experts_per_tok"
                )
            chosen, counts_from = probs.topk(int(top_k), dim=-1).indices, "router_top_k"
        if chosen.shape[0] != probs.shape[0]:
            raise ValueError(
                f"{parent}: router saw {probs.shape[0]} tokens, experts {chosen.shape[0]}"
            )
        if token_mask is not None and token_mask.numel() == probs.shape[0]:
            keep = token_mask.to(probs.device)
            probs, chosen = probs[keep], chosen[keep.to(chosen.device)]
        executed = chosen[chosen < num_experts]  # drop expert-parallel sentinels
        counts = torch.bincount(executed.reshape(-1).cpu(), minlength=num_experts)
        stats = RoutingStats.from_routing(probs, None, counts)
        # expert-parallel sentinels (another rank's experts) are folded into the last expert here
        aux = float(
            load_balancing_loss(
                probs, chosen.clamp(max=num_experts - 1).to(probs.device), num_experts
            )
        )
        layers.append(LayerRouting(parent, stats, chosen.shape[1], aux, counts_from))
        pooled.append((probs, chosen.to(probs.device)))
    hf_aux = None
    if pooled and len({(p.shape[1], c.shape[1]) for p, c in pooled}) == 1:
        probs = torch.cat([p for p, _ in pooled])
        chosen = torch.cat([c for _, c in pooled])
        hf_aux = float(chosen.shape[1] * load_balancing_loss(probs, chosen, probs.shape[1]))
    return RoutingReport(layers, hf_aux)
