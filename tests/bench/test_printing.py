"""print_table: every cell shown in full, the first ``left`` columns aligned left, rows checked."""

import io

import pytest
from rich.console import Console

from pimoe.bench.printing import print_table


def test_print_table_shows_every_cell_and_aligns_numbers_right() -> None:
    out = io.StringIO()
    print_table(
        Console(file=out, width=40), "T", ("name", "value"), [("a", "0.99153"), ("bb", "1")], left=1
    )
    lines = out.getvalue().splitlines()
    assert "0.99153" in out.getvalue()  # folded, never cut to "0.99…"
    row_a, row_bb = (next(line for line in lines if f" {n} " in line) for n in ("a", "bb"))
    assert row_a.index("a") == row_bb.index("bb")  # left-aligned names start together
    assert row_a.index("0.99153") + 7 == row_bb.index("1") + 1  # right-aligned numbers end together


def test_print_table_rejects_a_row_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="a row of 1 cells for 2 columns"):
        print_table(Console(file=io.StringIO()), "T", ("a", "b"), [("x",)])
