"""``pimoe demo``: the pretrained SmolLM2 demo, or the from-scratch one with ``--scratch``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pimoe.extras import check_extra


def demo(
    scratch: Annotated[
        bool,
        typer.Option(
            help="Run the from-scratch demo instead: train a small byte-level PiMoE LM and its dense twin (implied by --steps or --config)."
        ),
    ] = False,
    model: Annotated[
        str,
        typer.Option(
            help="Pretrained model: a name known to pimoe.models.load_pretrained or a local Hugging Face folder."
        ),
    ] = "smollm2-135m-instruct",
    top_k: Annotated[
        int, typer.Option(min=1, max=8, help="Experts per token of the split model (of 8).")
    ] = 4,
    retrain: Annotated[
        bool,
        typer.Option(
            help="Cluster and train the routers again instead of loading them from the cache."
        ),
    ] = False,
    threads: Annotated[int, typer.Option(min=1, help="torch threads for the SmolLM2 demo.")] = 2,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="From-scratch demo: training steps for each of the two models (default 600).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder to save the results JSON (and, from scratch, the trained model)."
        ),
    ] = None,
    computation: Annotated[
        bool,
        typer.Option(
            help="Add the computation-experts stage: LM alone vs PiMoE hand-off vs tool call (~1-2 min)."
        ),
    ] = False,
    chain: Annotated[
        bool,
        typer.Option(
            help="SmolLM2 demo: 3 held-out word problems answered by the computation chain next to the LM alone (trained once at the --quick size, then cached)."
        ),
    ] = True,
    config: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="From-scratch demo: chosen_config.json of a `pimoe search --task lm` run: train that model instead of the default.",
        ),
    ] = None,
) -> None:
    """Split the pretrained SmolLM2-135M-Instruct into experts and compare it with the dense model on
    Python's bundled docs (perplexity, routing, an answer from each); --scratch trains a small PiMoE LM
    and its dense twin instead."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(
            "CUDA was requested but torch.cuda.is_available() is False", param_hint="--device"
        )
    if not (scratch or steps is not None or config is not None):
        from dataclasses import replace

        check_extra("models", "pimoe demo")
        from pimoe.demo_pretrained import PretrainedDemoSettings, run_pretrained_demo

        settings = replace(
            PretrainedDemoSettings(), model=model, top_k=top_k, seed=seed, chain=chain
        )
        run_pretrained_demo(
            settings,
            device=device,
            threads=threads,
            retrain=retrain,
            out_dir=str(out) if out else None,
            computation=computation,
        )
        return
    from pimoe.demo import check_demo_config, run_demo

    model_config = None
    if config is not None:
        from pimoe.search import load_config

        try:
            model_config = load_config(config)
            check_demo_config(model_config)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--config") from err
    run_demo(
        steps=steps or 600,
        device=device,
        seed=seed,
        out_dir=str(out) if out else None,
        computation=computation,
        config=model_config,
    )
