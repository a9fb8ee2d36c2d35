import io

from rich.console import Console

from pimoe.tables import Table


def test_numbers_are_never_cut_at_80_columns() -> None:
    numbers = [f"{0.123456789 * (i + 1):.9f}" for i in range(12)]
    table = Table(*[f"col{i}" for i in range(12)], title="wide")
    table.add_row(*numbers)
    console = Console(file=io.StringIO(), width=80, force_terminal=False)
    console.print(table)
    rows = [
        line.split("│")[1:-1]
        for line in console.file.getvalue().splitlines()
        if line.count("│") == 13
    ]
    # each number is folded over several lines, never cut
    assert ["".join(row[i].strip() for row in rows) for i in range(12)] == numbers
