"""Training the routers of a split-upcycled model (MoEfication), the dense weights frozen.

Labels come from the model itself: for MLP input ``x`` the *importance* of expert ``e`` is the norm
of its output ``||y_e(x)||`` (``[T, E]``); the dense MLP output is ``sum_e y_e(x)``. Each layer's
linear gate is trained to match the importance shares ``q = importance / sum(importance)`` with a
soft cross-entropy ``-sum_e q_e log softmax(gate(x))_e`` (full batch, Adam), so its top-k are the
experts that carry the most output. Held-out metrics per layer: top-k recall against the oracle
top-k by importance, and the relative error ``||MoE_k(x) - MLP(x)|| / ||MLP(x)||`` of the routed
layer next to the oracle's.

Balancing (``balance``): ``"aux_loss"`` adds the Switch loss of the router's own top-k choice
(weighted by ``aux_loss_coef``); ``"bias"`` trains a selection bias with DeepSeek-V3's update
after each step (``bias += bias_update_rate * sign(mean_load - load)``) and leaves the layer's
router with ``balance="bias"`` and that bias. Held-out reports then add the imbalance (max/mean
assignments per expert) of the router's choice.

Trained routers and the neuron partitions are saved together (safetensors), so an upcycled model
is rebuilt from the dense one without clustering or training (:func:`load_routers`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.io import (
    atomic_write_bytes,
    check_safetensors_shapes,
    read_safetensors_header,
)
from pimoe.models.progress import Progress
from pimoe.models.upcycle import find_mlps, moe_layers, upcycle
from pimoe.moe import PiMoE, load_balancing_loss, set_balance

ROUTERS_FORMAT = "pimoe-upcycle-routers/1"


@dataclass
class RouterLayerReport:
    """One layer's router training: soft cross-entropy before/after on the training tokens and
    held-out routing quality at the layer's ``top_k`` (NaN when no held-out inputs were given)."""

    loss_start: float
    loss_end: float
    heldout_recall: float  # share of the oracle top-k experts the router picks
    heldout_rel_error: float  # ||MoE_k - MLP|| / ||MLP|| with the trained router
    oracle_rel_error: float  # the same with the oracle top-k (the floor for this partition)
    heldout_imbalance: float = float(
        "nan"
    )  # max / mean assignments per expert of the router's top-k

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@torch.no_grad()
def expert_outputs(layer: PiMoE, x: Tensor, chunk: int = 2048) -> Tensor:
    """Every expert's output on every token: ``x [T, D]`` -> ``[E, T, D]`` (float32, CPU)."""
    w_in, w_out = layer.experts.w_in, layer.experts.w_out  # [E, 2F_e, D], [E, D, F_e]
    out = []
    for part in x.split(chunk):
        h = torch.einsum("td,efd->etf", part.to(w_in.device, w_in.dtype), w_in)
        gate, up = h.chunk(2, dim=-1)
        out.append(torch.einsum("etf,edf->etd", F.silu(gate) * up, w_out).float().cpu())
    return torch.cat(out, dim=1)


def _soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    return -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def _shares(outputs: Tensor) -> Tensor:
    """``[E, T, D]`` expert outputs -> ``[T, E]`` importance shares."""
    norms = outputs.norm(dim=-1).T  # [T, E]
    return norms / norms.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _choose(logits: Tensor, k: int, bias: Tensor | None) -> Tensor:
    """``[T, k]`` experts a softmax router picks from ``logits [T, E]`` (with a selection bias)."""
    scores = logits.softmax(dim=-1)
    return (scores if bias is None else scores + bias.to(scores)).topk(k, dim=-1).indices


@torch.no_grad()
def routing_quality(
    layer: PiMoE, x: Tensor, top_k: int | None = None
) -> tuple[float, float, float, float]:
    """``(recall, rel_error, oracle_rel_error, imbalance)`` of ``layer``'s router (with its
    selection bias, if any) at ``top_k`` (default the layer's) on inputs ``x [T, D]``; see the
    module docs."""
    k = top_k or layer.top_k
    outputs = expert_outputs(layer, x)  # [E, T, D]
    dense = outputs.sum(dim=0)  # [T, D]
    oracle = outputs.norm(dim=-1).T.topk(k, dim=-1).indices  # [T, k]
    logits = layer.router.gate(x.to(layer.router.gate.weight)).float().cpu()
    bias = layer.router.e_score_correction_bias
    chosen = _choose(logits, k, None if bias is None else bias.cpu())
    counts = torch.bincount(chosen.reshape(-1), minlength=layer.num_experts).float()

    def rel_error(idx: Tensor) -> float:
        mask = torch.zeros(x.shape[0], layer.num_experts).scatter_(1, idx, 1.0)  # [T, E]
        routed = torch.einsum("te,etd->td", mask, outputs)
        return float((routed - dense).norm() / dense.norm())

    recall = (chosen.unsqueeze(-1) == oracle.unsqueeze(-2)).any(-1).float().mean()
    return float(recall), rel_error(chosen), rel_error(oracle), float(counts.max() / counts.mean())


def _fit_gate(
    layer: PiMoE,
    x: Tensor,
    target: Tensor,
    steps: int,
    lr: float,
    balance: str,
    aux_loss_coef: float,
    bias_update_rate: float,
    loads: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, list[float]]:
    """Full-batch Adam on a copy of ``layer``'s gate weight ``[E, D]`` so that the softmax of
    ``x [T, D] @ weight.T`` matches ``target [T, E]``; returns the weight, the selection bias
    ``[E]`` (zeros unless ``balance="bias"``) and the soft cross-entropy per step. ``loads``, if
    given, receives each step's assignments per expert ``[E]`` (the choice with the bias of that
    step)."""
    weight = layer.router.gate.weight.detach().float().clone().requires_grad_()
    bias = torch.zeros(layer.num_experts, device=x.device)
    optimizer = torch.optim.Adam([weight], lr=lr)

    def step() -> float:
        logits = x @ weight.T  # [T, E]
        fit = _soft_ce(logits, target)
        loss = fit
        if balance == "aux_loss":
            chosen = _choose(logits.detach(), layer.top_k, None)
            loss = fit + aux_loss_coef * load_balancing_loss(
                logits.softmax(-1), chosen, layer.num_experts
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        load = torch.bincount(
            _choose(logits.detach(), layer.top_k, bias).reshape(-1), minlength=len(bias)
        )
        if loads is not None:
            loads.append(load)
        if balance == "bias":
            bias.add_(bias_update_rate * torch.sign(load.float().mean() - load.float()))
        return fit.item()

    return weight, bias, [step() for _ in range(steps)]


def train_routers(
    model: nn.Module,
    train_inputs: Sequence[Tensor],
    heldout_inputs: Sequence[Tensor] | None = None,
    steps: int = 200,
    lr: float = 1e-2,
    progress: bool = False,
    balance: Literal["none", "aux_loss", "bias"] = "none",
    aux_loss_coef: float = 0.01,
    bias_update_rate: float = 1e-3,
) -> list[RouterLayerReport]:
    """Train the gate of every :class:`PiMoE` layer of ``model`` on its dense MLP inputs.

    Args:
        model: a model upcycled with ``method="split"``; only the router gates change.
        train_inputs: per layer, ``[T, D]`` inputs of the *dense* MLP on training text
            (:func:`pimoe.models.upcycle_cluster.capture_mlp_inputs` before upcycling).
        heldout_inputs: per layer, ``[T', D]`` inputs on held-out text, for the report.
        steps: full-batch Adam steps per layer.
        lr: Adam learning rate.
        progress: one progress display over the layers (:class:`pimoe.models.progress.Progress`,
            with the last layer's fitted loss).
        balance: ``"none"``, ``"aux_loss"`` (Switch loss times ``aux_loss_coef``) or ``"bias"``
            (selection bias updated by ``bias_update_rate`` after each step), see the module docs.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PiMoE layer to train")
    if len(train_inputs) != len(layers) or (
        heldout_inputs is not None and len(heldout_inputs) != len(layers)
    ):
        raise ValueError(f"need one input tensor per PiMoE layer ({len(layers)})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if balance not in ("none", "aux_loss", "bias"):
        raise ValueError(f"balance must be 'none', 'aux_loss' or 'bias', got {balance!r}")
    reports = []
    with Progress(len(layers), "train routers", enabled=progress) as bar:
        for i, layer in enumerate(layers):
            gate = layer.router.gate
            x = train_inputs[i].to(gate.weight.device, torch.float32)
            target = _shares(expert_outputs(layer, x)).to(x.device)
            weight, bias, losses = _fit_gate(
                layer,
                x,
                target,
                steps,
                lr,
                balance,
                aux_loss_coef,
                bias_update_rate,
            )
            with torch.no_grad():
                gate.weight.copy_(weight)
                end = _soft_ce(x @ weight.T, target).item()
                if balance == "bias":
                    set_balance(layer, "bias", bias_update_rate)
                    assert layer.router.e_score_correction_bias is not None
                    layer.router.e_score_correction_bias.copy_(bias)
            quality = (
                routing_quality(layer, heldout_inputs[i])
                if heldout_inputs is not None
                else (float("nan"),) * 4
            )
            reports.append(RouterLayerReport(losses[0], end, *quality))
            bar.update(loss=end)
    return reports


def save_routers(
    model: nn.Module,
    path: str | os.PathLike[str],
    metadata: dict[str, object] | None = None,
    experts: bool = False,
) -> None:
    """Write the router gates and neuron partitions of a split-upcycled ``model`` to a safetensors
    file (atomically); ``metadata`` (JSON-serializable) is stored with them. With ``experts``, also
    the down projections ``w_out`` (needed after :func:`pimoe.models.upcycle_refit.refit_experts`)."""
    from safetensors.torch import save

    layers = moe_layers(model)
    if not layers or not all(hasattr(layer, "neuron_assignment") for layer in layers):
        raise ValueError("save_routers needs a model upcycled with method='split'")
    tensors: dict[str, Tensor] = {}
    for i, layer in enumerate(layers):
        tensors[f"{i}.gate"] = layer.router.gate.weight.detach().float().cpu().contiguous()
        tensors[f"{i}.assignment"] = layer.get_buffer("neuron_assignment").cpu().contiguous()
        if experts:
            w_out: Tensor = layer.experts.w_out  # type: ignore[assignment]
            tensors[f"{i}.w_out"] = w_out.detach().float().cpu().contiguous()
    info = {
        "format": ROUTERS_FORMAT,
        "num_experts": str(layers[0].num_experts),
        "top_k": str(layers[0].top_k),
        "extra": json.dumps(metadata or {}),
    }
    atomic_write_bytes(path, save(tensors, metadata=info))


def load_routers(
    model: nn.Module,
    path: str | os.PathLike[str],
    top_k: int | None = None,
    experts: bool = True,
) -> dict[str, object]:
    """Upcycle the dense ``model`` in place (``"split"``) with the partitions and routers saved by
    :func:`save_routers` (and the saved down projections, if any, unless ``experts`` is False);
    ``top_k`` defaults to the saved one. Returns the saved metadata.

    Raises:
        ValueError: not a routers file, or one saved for another model shape.
    """
    from safetensors.torch import load_file

    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(f"{type(model).__name__} has no gated MLP to upcycle")
    info, _ = read_safetensors_header(path)
    if info.get("format") != ROUTERS_FORMAT or not {"num_experts", "top_k", "extra"} <= set(info):
        raise ValueError(f"{path}: not a pimoe routers file (format {info.get('format')!r})")
    num_experts = int(info["num_experts"])
    gate_proj: nn.Linear = mlps[0][1].gate_proj  # type: ignore[assignment]
    width, d_model = gate_proj.weight.shape
    expected: dict[str, tuple[int, ...]] = {}
    for i in range(len(mlps)):
        expected[f"{i}.gate"] = (num_experts, d_model)
        expected[f"{i}.assignment"] = (width,)
        expected[f"{i}.w_out"] = (num_experts, d_model, width // num_experts)
    check_safetensors_shapes(
        path, expected, may_be_missing=[f"{i}.w_out" for i in range(len(mlps))]
    )
    tensors = load_file(str(path))
    upcycle(
        model,
        num_experts,
        top_k or int(info["top_k"]),
        "split",
        assignments=[tensors[f"{i}.assignment"] for i in range(len(mlps))],
    )
    with torch.no_grad():
        for i, layer in enumerate(moe_layers(model)):
            layer.router.gate.weight.copy_(tensors[f"{i}.gate"])
            if experts and f"{i}.w_out" in tensors:
                target: Tensor = layer.experts.w_out  # type: ignore[assignment]
                target.copy_(tensors[f"{i}.w_out"])
    return json.loads(info["extra"])
