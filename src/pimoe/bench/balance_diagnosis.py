"""Why the selection bias costs so much perplexity in the SmolLM2 router workload.

Fits the routers of the split-upcycled SmolLM2 (as ``pimoe bench balance``'s router workload) once
with the Switch loss and once with the selection bias, then reports per layer: held-out imbalance,
relative output error and the final bias; the model's held-out perplexity with the bias, and with
the bias zeroed in a few chosen layers; and, for a few layers, the per-step loads of the bias fit
(full batch) next to the gaps between the 4th and 5th softmax scores of the fitted router (how
far a bias step of ``u`` reaches).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from pimoe.bench.balance import BalanceBenchConfig, router_setup
from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text


def diagnose(
    steps: int = 200,
    rate: float = 1e-3,
    coef: float = 1.0,
    trace_layers: tuple[int, ...] = (0, 29),
    zero_layers: tuple[int, ...] = (0, 28, 29),
    json_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the diagnosis (one thread); returns (and writes to ``json_path``) the result."""
    import os

    from pimoe.models import train_routers, upcycle
    from pimoe.models.perplexity import perplexity
    from pimoe.models.router_training import _fit_gate, _shares, expert_outputs
    from pimoe.models.upcycle import moe_layers

    torch.set_num_threads(1)
    cfg = BalanceBenchConfig(router_steps=steps)
    result: dict[str, Any] = run_header("balance_diagnosis", cfg)
    result["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    dense, heldout, train_inputs, heldout_inputs, assignments = router_setup(cfg, progress)

    def split() -> torch.nn.Module:
        return upcycle(copy.deepcopy(dense), 8, 4, "split", assignments=assignments, seed=cfg.seed)

    contenders: dict[str, dict[str, Any]] = {
        f"switch {coef:g}": {"balance": "aux_loss", "aux_loss_coef": coef},
        f"bias u={rate:g}": {"balance": "bias", "bias_update_rate": rate},
    }
    for name, options in contenders.items():
        model = split()
        reports = train_routers(
            model, train_inputs, heldout_inputs, steps=steps, progress=progress, **options
        )
        row: dict[str, Any] = {
            "heldout_perplexity": round(perplexity(model, heldout, batch_size=2), 2),
            "heldout_imbalance_per_layer": [round(r.heldout_imbalance, 3) for r in reports],
            "heldout_rel_error_per_layer": [round(r.heldout_rel_error, 3) for r in reports],
        }
        if options["balance"] == "bias":
            layers = moe_layers(model)
            row["bias_absmax_per_layer"] = [
                round(float(layer.router.get_buffer("e_score_correction_bias").abs().max()), 3)
                for layer in layers
            ]
            for i in zero_layers:
                layers[i].router.get_buffer("e_score_correction_bias").zero_()
            row["heldout_perplexity_bias_zeroed_in"] = {
                "layers": list(zero_layers),
                "perplexity": round(perplexity(model, heldout, batch_size=2), 2),
            }
        result[name] = row
        del model
    layers = moe_layers(split())
    traces = {}
    for i in trace_layers:
        x = train_inputs[i].float()
        target = _shares(expert_outputs(layers[i], x))
        loads: list[torch.Tensor] = []
        weight, _, _ = _fit_gate(layers[i], x, target, steps, 1e-2, "bias", 0.0, rate, loads)
        scores = (x @ weight.detach().T).softmax(-1).sort(-1, descending=True).values
        gap = scores[:, 3] - scores[:, 4]
        traces[str(i)] = {
            "loads_every_10_steps": [loads[s].tolist() for s in range(0, steps, 10)],
            "loads_last_4_steps": [load.tolist() for load in loads[-4:]],
            "score_gap_4th_5th_quartiles": [
                round(float(q), 4) for q in gap.quantile(torch.tensor([0.25, 0.5, 0.75]))
            ],
        }
    result["traces"] = traces
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str))
    return result
