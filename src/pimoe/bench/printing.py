"""Printing a benchmark's result table: title, column headers, one row of formatted cells each."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console

from pimoe.tables import Table


def print_table(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    left: int = 0,
) -> None:
    """Print a :class:`pimoe.tables.Table` (cells fold, never cut): the first ``left`` columns
    aligned left, the others right (numbers); each row gives one formatted cell per column."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left else "right")
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} cells for {len(columns)} columns")
        table.add_row(*row)
    console.print(table)
