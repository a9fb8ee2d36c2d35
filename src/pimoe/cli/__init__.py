"""The ``pimoe`` command (console script ``pimoe = "pimoe.cli:app"``): the typer app and the wiring of
its subcommands."""

from __future__ import annotations

from typing import Annotated

import typer

# Subcommands defined next to their subsystems; these modules import only typer at load time
# (Optuna, Flower/Ray and the models load when the command runs).
from pimoe.bench.cli import bench_app
from pimoe.cli import demo, serve
from pimoe.cli.group import PimoeGroup, needs, print_version
from pimoe.compress.cli import compress as compress_command
from pimoe.compute.cli import chain_app
from pimoe.federated.cli import federate as federate_command
from pimoe.search.cli import search as search_command

__all__ = ["PimoeGroup", "app", "needs"]

app = typer.Typer(
    cls=PimoeGroup,
    no_args_is_help=True,
    help="pimoe: build, compress, serve and train Mixture-of-Experts models.",
)
app.add_typer(bench_app, name="bench")
app.add_typer(chain_app, name="chain")
app.command("search")(needs("search")(search_command))
app.command("federate")(needs("federated")(federate_command))
app.command("compress")(compress_command)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """pimoe: build, compress, serve and train Mixture-of-Experts models."""


app.command()(demo.demo)
app.command()(needs("serve")(serve.serve))
app.command("save-demo-model")(serve.save_demo_model)
