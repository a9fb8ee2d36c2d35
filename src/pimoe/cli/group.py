"""Pieces shared by the ``pimoe`` command's subcommands: the group class that names a missing
optional dependency, the ``needs`` decorator and the ``--version`` callback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
import typer
from typer.core import TyperGroup

from pimoe.extras import check_extra, explain_missing


class PimoeGroup(TyperGroup):
    """Runs a (sub)command; a missing optional dependency ends it with one line naming the extra."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as err:
            missing = explain_missing(err)
            if missing is None:
                raise
            typer.echo(str(missing), err=True)
            raise typer.Exit(1) from None


def needs(*extras: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command: check that ``extras`` are installed before it starts any work."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def checked(*args: Any, **kwargs: Any) -> Any:
            name = command.__name__.removesuffix("_command").replace("_", "-")
            for extra in extras:
                check_extra(extra, f"pimoe {name}")
            return command(*args, **kwargs)

        return checked

    return decorate


def print_version(value: bool) -> None:
    if value:
        from pimoe import __version__

        typer.echo(f"pimoe {__version__}")
        raise typer.Exit()
