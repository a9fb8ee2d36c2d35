"""End-to-end demo: train a byte-level PiMoE LM on Python's documentation next to its dense twin.

``python -m pimoe.demo [--steps 300] [--device cpu|cuda] [--seed 0] [--out-dir DIR] [--computation]``.
Both models see the same batches in the same order and are scored on the same held-out batches.
``--computation`` adds a second stage: the computation-experts comparison of
``pimoe bench computation --quick`` on 20 held-out problems (about a minute more).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pimoe.data import byte_splits, load_pydoc_text
from pimoe.io import atomic_write_text, save_png
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig
from pimoe.tables import Table
from pimoe.training import STATS_STEPS, TrainResult, train_lm

CURVE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def loss_curve(losses: list[float]) -> dict[str, float]:
    """Mean loss over windows of 10% of the steps placed at 0%, 25%, 50%, 75% and 100%."""
    n = len(losses)
    width = max(1, n // 10)
    curve = {}
    for point in CURVE_POINTS:
        first = min(max(0, round(point * n) - width // 2), n - width)
        label = f"{first * 100 // n}-{(first + width) * 100 // n}%"
        curve[label] = sum(losses[first : first + width]) / width
    return curve


def _summary(result: TrainResult) -> dict[str, object]:
    model = result.model
    return {
        "total_params": model.num_params(),
        "active_params": model.num_params(active=True),
        "val_loss": round(result.val_loss, 4),
        "val_bits_per_byte": round(result.val_loss / math.log(2), 4),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "final_train_ce": round(sum(result.ce[-10:]) / len(result.ce[-10:]), 4),
        "loss_curve": {k: round(v, 4) for k, v in loss_curve(result.losses).items()},
        "ce_curve": {k: round(v, 4) for k, v in loss_curve(result.ce).items()},
        "routing": [stats.as_dict() for stats in result.routing],
    }


def _print_report(console: Console, moe: TrainResult, dense: TrainResult, results: dict) -> None:
    routing = Table(
        title=f"Routing, last {STATS_STEPS} training steps (load = share of assignments)"
    )
    for column in ("layer", "load per expert", "dead", "imbalance", "entropy", "top-1 conf."):
        routing.add_column(column, justify="right")
    for i, stats in enumerate(moe.routing):
        routing.add_row(
            str(i),
            " ".join(f"{x:.2f}" for x in stats.load),
            str(stats.dead_experts or "-"),
            f"{stats.imbalance:.2f}",
            f"{stats.entropy:.3f} / {math.log(stats.num_experts):.3f}",
            f"{stats.confidence:.3f}",
        )
    console.print(routing)

    curves = Table(title="Training loss, mean over 10% of the steps")
    curves.add_column("run")
    labels = list(loss_curve(moe.losses))
    for label in labels:
        curves.add_column(label, justify="right")
    aux_label = f"MoE aux (sum of {len(moe.routing)} layers)"
    for run, values in (
        ("MoE total", moe.losses),
        ("MoE CE", moe.ce),
        (aux_label, moe.aux),
        ("dense CE", dense.ce),
    ):
        curves.add_row(run, *(f"{v:.3f}" for v in loss_curve(values).values()))
    console.print(curves)
    experts = moe.routing[0].num_experts if moe.routing else 0
    coef = results["config"]["moe"]
    console.print(
        f"aux is the load-balancing loss (Switch Transformer, E * sum_e f_e * P_e) summed over "
        f"{len(moe.routing)} MoE layers: {len(moe.routing)} means perfectly even routing, "
        f"{experts * len(moe.routing)} all tokens on one expert per layer. MoE total = CE + "
        f"{coef['aux_loss_coef']} aux + {coef['z_loss_coef']} router z-loss."
    )

    compare = Table(title="PiMoE vs dense twin (same active parameters, data, steps and seed)")
    for column in (
        "model",
        "total params",
        "active params",
        "val CE (nats)",
        "val bits/byte",
        "train tokens/s",
    ):
        compare.add_column(column, justify="right")
    for name in ("moe", "dense"):
        row = results[name]
        compare.add_row(
            name,
            f"{row['total_params']:,}",
            f"{row['active_params']:,}",
            f"{row['val_loss']:.4f}",
            f"{row['val_bits_per_byte']:.4f}",
            f"{row['tokens_per_s']:,.0f}",
        )
    console.print(compare)


def plot_curves(moe: TrainResult, dense: TrainResult, path: Path) -> None:
    """Save a PNG of both runs' training CE (moving average over 20 steps) and the MoE aux loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: list[float], width: int = 20) -> list[float]:
        return [
            sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
            for i in range(len(values))
        ]

    fig, (ax_ce, ax_aux) = plt.subplots(1, 2, figsize=(10, 4))
    ax_ce.plot(smooth(moe.ce), label=f"PiMoE (val {moe.val_loss:.3f})")
    ax_ce.plot(smooth(dense.ce), label=f"dense twin (val {dense.val_loss:.3f})")
    ax_ce.set(xlabel="step", ylabel="train cross-entropy (nats/byte)", title="Training loss")
    ax_ce.legend()
    ax_aux.plot(smooth(moe.aux), color="tab:green")
    ax_aux.axhline(len(moe.routing), color="gray", linestyle="--", label="perfect balance")
    ax_aux.set(xlabel="step", ylabel="sum over MoE layers", title="Load-balancing loss")
    ax_aux.legend()
    fig.tight_layout()
    save_png(fig, path)


def run_computation_stage(console: Console, seed: int) -> dict:
    """Second stage (``--computation``): the computation-experts comparison at the ``--quick``
    size on 20 held-out problems (CPU, one thread): LM alone vs PiMoE hand-off vs tool call."""
    from pimoe.bench.computation import QUICK, print_report, run

    console.print(
        "[bold]Computation experts[/bold]: text expert + token-level router + exact "
        "computation expert vs the LM alone vs a tool call (see docs/computation.md)"
    )
    result = run(replace(QUICK, eval_problems=20, seed=seed, threads=1))
    print_report(result, console)
    return result


def check_demo_config(config: LMConfig) -> None:
    """Raise ``ValueError`` unless ``config`` suits the demo: byte-level (``vocab_size`` 256) and
    with at least one MoE layer (else the demo would compare two identical dense models)."""
    if config.vocab_size != 256:
        raise ValueError(
            f"the demo trains a byte-level LM: vocab_size must be 256, got {config.vocab_size} "
            "(use a config from `pimoe search --task lm`)"
        )
    if not any(config.is_moe(layer) for layer in range(config.n_layer)):
        raise ValueError(
            f"the config has no MoE layer (n_layer={config.n_layer}, moe_every={config.moe_every}: "
            f"only blocks moe_every-1, 2*moe_every-1, ... are MoE), so the demo would compare "
            "two identical dense models; use moe_every <= n_layer"
        )


def run_demo(
    steps: int = 600,
    device: str = "cpu",
    seed: int = 0,
    out_dir: str | None = None,
    computation: bool = False,
    config: LMConfig | None = None,
) -> dict:
    """Train the demo MoE LM and its dense twin on ``pydoc_data`` text, print the comparison,
    a routing table and a sample, optionally save the MoE model and results; return the results.
    ``config`` replaces the default model (e.g. one chosen by ``pimoe search --task lm``; it must
    be byte-level: ``vocab_size`` 256). With ``computation``, then run
    :func:`run_computation_stage` (results under "computation")."""
    if config is not None:
        check_demo_config(config)
    console = Console()
    start = time.perf_counter()
    train, val = byte_splits(load_pydoc_text())
    config = config or LMConfig(
        block_size=128,
        n_layer=4,
        n_head=4,
        d_model=128,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=128),
    )
    settings: dict[str, Any] = {
        "steps": steps,
        "batch_size": 16,
        "lr": 2e-3,
        "device": device,
        "seed": seed,
    }
    console.print(
        f"pydoc_data text: {len(train):,} train bytes, {len(val):,} held-out bytes; "
        f"{steps} steps of {settings['batch_size']}x{config.block_size} bytes on {device}"
    )
    moe = train_lm(config, train, val, **settings)
    dense = train_lm(config.dense_twin(), train, val, **settings)

    prompt = torch.tensor([list(b"The ")], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    moe.model.eval()
    sample_ids = moe.model.generate(prompt, 100, temperature=0.8, generator=generator)
    sample = bytes(sample_ids[0].tolist()).decode("utf-8", errors="replace")

    results: dict = {
        "data": "pydoc_data.topics (Python's English help topics), byte-level",
        "train_bytes": len(train),
        "val_bytes": len(val),
        **settings,
        "config": asdict(config),
        "moe": _summary(moe),
        "dense": _summary(dense),
        "sample": sample,
    }
    _print_report(console, moe, dense, results)
    console.print("[bold]Sample from the MoE model[/bold] (prompt b'The ', temperature 0.8):")
    console.print(repr(sample), markup=False, highlight=False)
    if computation:
        results["computation"] = run_computation_stage(console, seed)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    console.print(f"demo wall time: {results['wall_s']:.1f} s")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        moe.model.save(out / "model.safetensors")
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        plot_curves(moe, dense, out / "loss_curves.png")
        console.print(f"saved model.safetensors, results.json and loss_curves.png in {out}")
    return results


def main() -> None:
    """Command-line entry point (``python -m pimoe.demo --help``)."""
    import typer

    typer.run(run_demo)


if __name__ == "__main__":
    main()
