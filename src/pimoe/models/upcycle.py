"""Dense -> MoE upcycling of a Hugging Face causal LM.

Every gated MLP ``down(silu(gate(x)) * up(x))`` (LLaMA, Mistral, Qwen2, SmolLM2, ...) is replaced
by a :class:`pimoe.moe.PiMoE` layer with built-in SwiGLU experts, whose weights are
``experts.w_in [E, 2F_e, D]`` (gate rows then up rows) and ``experts.w_out [E, D, F_e]``.

- ``"copy"``: sparse upcycling (Komatsuzaki et al. 2022). Every expert is a copy of the FFN
  (``F_e = F``) and the router is new; the top-k weights are normalized to sum to 1, so at
  initialization the layer equals the dense MLP for any router.
- ``"split"``: MoEfication (Zhang et al. 2022). The ``F`` hidden neurons are partitioned into
  ``E`` experts of ``F / E`` neurons (by co-activation clustering on real text, see
  :mod:`pimoe.models.upcycle_cluster`) and the selected experts' outputs are summed unweighted
  (``weight_outputs=False``): with ``top_k == E`` the layer equals the dense MLP; with fewer, each
  token runs ``top_k / E`` of the FFN. The router needs training
  (:mod:`pimoe.models.router_training`).

Each split layer keeps its partition in the non-persistent buffer ``neuron_assignment [F]``
(expert of each dense neuron) so it can be saved next to the routers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.models.progress import track
from pimoe.models.upcycle_cluster import cluster_neurons, gated_projections
from pimoe.moe import PiMoE, RoutingStats, StackedExperts

Method = Literal["copy", "split"]
METHODS = ("copy", "split")


def find_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every gated MLP in ``model`` (a module with ``nn.Linear``
    attributes ``gate_proj``, ``up_proj`` and ``down_proj``), in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if all(
            isinstance(getattr(module, attr, None), nn.Linear)
            for attr in ("gate_proj", "up_proj", "down_proj")
        )
    ]


def moe_layers(model: nn.Module) -> list[PiMoE]:
    """The :class:`PiMoE` layers of ``model``, in module order."""
    return [module for module in model.modules() if isinstance(module, PiMoE)]


def _check_mlp(name: str, mlp: nn.Module) -> None:
    if any(getattr(mlp, attr).bias is not None for attr in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError(
            f"MLP {name!r} has biases; upcycle supports bias-free gated MLPs (LLaMA style)"
        )
    act = getattr(mlp, "act_fn", None)
    probe = torch.linspace(-4, 4, 9)
    if not callable(act) or not torch.allclose(act(probe), F.silu(probe)):
        raise ValueError(f"MLP {name!r} does not use SiLU ({act!r}); PiMoE's experts are SwiGLU")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _expert_weights(mlp: nn.Module, groups: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack the neurons of each group: ``w_in [E, 2F_e, D]`` (gate rows, up rows), ``w_out [E, D, F_e]``."""
    gate, up, down = (proj.weight for proj in gated_projections(mlp))  # [F, D], [F, D], [D, F]
    w_in = torch.stack([torch.cat((gate[g], up[g]), dim=0) for g in groups])
    w_out = torch.stack([down[:, g] for g in groups])
    return w_in, w_out


def split_groups(assignment: Tensor, num_experts: int) -> list[Tensor]:
    """Neuron indices of each expert, ascending, from ``assignment [F]`` (expert id per neuron);
    every expert must get the same number of neurons."""
    if assignment.dim() != 1 or assignment.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"an assignment must be a 1-D integer tensor, got {assignment.dtype} {tuple(assignment.shape)}"
        )
    counts = torch.bincount(assignment, minlength=num_experts)
    if len(counts) != num_experts or int(assignment.min()) < 0 or not (counts == counts[0]).all():
        raise ValueError(
            f"an assignment must give each of the {num_experts} experts the same number of "
            f"neurons, got counts {counts.tolist()}"
        )
    return [torch.nonzero(assignment == e).flatten() for e in range(num_experts)]


def upcycle(
    model: nn.Module,
    num_experts: int,
    top_k: int,
    method: Method = "copy",
    *,
    assignments: Sequence[Tensor] | None = None,
    mlp_inputs: Sequence[Tensor] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Replace every gated MLP of ``model`` by a :class:`PiMoE` layer, **in place**; returns ``model``.

    Args:
        model: a Hugging Face causal LM (or any module) with LLaMA-style gated SiLU MLPs.
        num_experts: ``E``; for ``"split"`` it must divide the MLP width ``F``.
        top_k: experts per token (``1 <= top_k <= E``).
        method: ``"copy"`` (sparse upcycling) or ``"split"`` (MoEfication), see the module docs.
        assignments: ``"split"`` only: per MLP, ``[F]`` expert id of each neuron (balanced), e.g.
            from a saved upcycle; skips clustering.
        mlp_inputs: ``"split"`` only, when ``assignments`` is not given: per MLP, ``[T, D]`` inputs
            captured on real text (:func:`pimoe.models.upcycle_cluster.capture_mlp_inputs`), used
            for co-activation clustering.
        seed: initializes the new routers (normal, std 0.02) and the clustering.
        progress: show a progress bar over layers.

    Raises:
        ValueError: bad method, ``top_k`` out of range, no gated MLP in ``model``, a non-SiLU or
            biased MLP, ``E`` not dividing ``F``, or missing / mismatched ``assignments`` /
            ``mlp_inputs``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for label, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be an int, got {type(value).__name__}")
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}"
        )
    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(
            f"{type(model).__name__} has no gated MLP (gate_proj/up_proj/down_proj) to upcycle"
        )
    for name, mlp in mlps:
        _check_mlp(name, mlp)
    if method == "split":
        width = gated_projections(mlps[0][1])[0].out_features
        if width % num_experts:
            raise ValueError(
                f"num_experts={num_experts} must divide the MLP width {width} for method='split'"
            )
        given = assignments if assignments is not None else mlp_inputs
        if given is None:
            raise ValueError(
                "method='split' needs assignments or mlp_inputs (captured on real text)"
            )
        if len(given) != len(mlps):
            raise ValueError(f"got {len(given)} assignments/mlp_inputs for {len(mlps)} MLPs")
    elif assignments is not None or mlp_inputs is not None:
        raise ValueError("assignments and mlp_inputs are for method='split'")

    generator = torch.Generator().manual_seed(seed)
    for i, (name, mlp) in enumerate(
        track(mlps, f"upcycle ({method}, {num_experts} experts)", enabled=progress)
    ):
        weight = gated_projections(mlp)[0].weight
        width, d_model = weight.shape
        assignment = None
        if method == "copy":
            groups = [torch.arange(width)] * num_experts
        else:
            if assignments is not None:
                assignment = assignments[i].to(torch.long).cpu()
            else:
                assert mlp_inputs is not None
                assignment = cluster_neurons(mlp, mlp_inputs[i], num_experts, seed=seed + i)
            if assignment.shape != (width,):
                raise ValueError(
                    f"assignment {i} has shape {tuple(assignment.shape)}, expected ({width},)"
                )
            groups = split_groups(assignment, num_experts)
        layer = PiMoE(
            d_model,
            num_experts=num_experts,
            top_k=top_k,
            ffn_dim=len(groups[0]),
            weight_outputs=method == "copy",
        )
        with torch.no_grad():
            w_in, w_out = _expert_weights(mlp, [g.to(weight.device) for g in groups])
            experts = layer.experts
            assert isinstance(experts, StackedExperts)  # built-in SwiGLU experts (ffn_dim given)
            experts.w_in.copy_(w_in)
            experts.w_out.copy_(w_out)
            layer.router.gate.weight.copy_(
                torch.randn(layer.router.gate.weight.shape, generator=generator) * 0.02
            )
        if assignment is not None:
            layer.register_buffer("neuron_assignment", assignment, persistent=False)
        _set_submodule(model, name, layer.to(device=weight.device, dtype=weight.dtype))
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(total, active)`` parameters: active counts only ``top_k / E`` of each :class:`PiMoE`
    layer's routed experts (what one token runs); everything else counts fully."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        experts = sum(p.numel() for p in layer.experts.parameters())
        inactive += experts - experts * layer.top_k // layer.num_experts
    return total, total - inactive


@contextmanager
def record_routing(model: nn.Module) -> Iterator[list[RoutingStats | None]]:
    """While active, sum the :class:`RoutingStats` of every forward call of each :class:`PiMoE`
    layer of ``model``; yields the list (one entry per layer, ``None`` until it has run)."""
    layers = moe_layers(model)
    totals: list[RoutingStats | None] = [None] * len(layers)

    def hook(i: int) -> Callable[..., None]:
        def add(layer: PiMoE, args: object, output: object) -> None:
            stats, total = layer.last_stats, totals[i]
            if stats is not None:
                totals[i] = stats if total is None else total + stats

        return add

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def set_top_k(model: nn.Module, top_k: int) -> None:
    """Change the experts per token of every :class:`PiMoE` layer of ``model`` (e.g. to compare
    k=2 and k=4 with the same routers)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PiMoE layer")
    for layer in layers:
        if not 1 <= top_k <= layer.num_experts:
            raise ValueError(f"top_k must be in [1, {layer.num_experts}], got {top_k}")
        layer.router.config = layer.router.config.replace(top_k=top_k)
        layer.config = layer.config.replace(top_k=top_k)
        layer.top_k = top_k
