"""``pimoe chain``: train and query the computation chain on a frozen pretrained LM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

chain_app = typer.Typer(
    help="PiMoE computation chain on a frozen pretrained LM (SmolLM2-135M-Instruct).",
    no_args_is_help=True,
)


@chain_app.command("train")
def train(
    out: Annotated[Path, typer.Option("--out", help="Folder for chain.safetensors + chain.json.")],
    quick: Annotated[
        bool, typer.Option(help="192 training problems instead of 400 (a few minutes on a CPU).")
    ] = False,
    model: Annotated[
        str, typer.Option(help="Base model: a pimoe.models name or a Hugging Face folder.")
    ] = "smollm2-135m-instruct",
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
) -> None:
    """Train the router and the text-to-computation head on the frozen LM and save them."""
    import json

    import torch

    from pimoe.compute.llm_train import QUICK_SETTINGS, ChainTrainSettings, train_chain
    from pimoe.models import load_pretrained

    torch.set_num_threads(threads)
    lm, tokenizer = load_pretrained(model)
    chain, report = train_chain(
        lm, tokenizer, model, QUICK_SETTINGS if quick else ChainTrainSettings()
    )
    chain.save(out)
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    typer.echo(f"saved to {out}")


@chain_app.command("ask")
def ask(
    folder: Annotated[Path, typer.Argument(help="A folder written by `pimoe chain train`.")],
    question: Annotated[str, typer.Argument(help="The question, in English.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens the LM generates.")] = 48,
) -> None:
    """Print the chain's answer to QUESTION."""
    from pimoe.compute.llm_chain import ComputationChain

    try:
        chain = ComputationChain.load(folder)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="FOLDER") from error
    typer.echo(chain.generate(question, max_new_tokens=max_new_tokens))
