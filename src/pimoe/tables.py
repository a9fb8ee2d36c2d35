"""Result tables that never cut a number.

rich shrinks a table that is wider than the console (80 columns when output is not a terminal)
and cuts cells with "…" by default, which turns ``0.99153`` into ``0.99…``. :class:`Table` is
rich's table with every column folding its text onto the next line instead.
"""

from __future__ import annotations

from typing import Any

from rich.table import Column
from rich.table import Table as RichTable


class Table(RichTable):
    """``rich.table.Table`` whose columns default to ``overflow="fold"`` (nothing is truncated)."""

    def add_column(self, *args: Any, overflow: Any = "fold", **kwargs: Any) -> None:
        super().add_column(*args, overflow=overflow, **kwargs)


__all__ = ["Column", "Table"]
