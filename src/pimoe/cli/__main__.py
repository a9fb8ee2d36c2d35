"""``python -m pimoe.cli``: the ``pimoe`` command."""

from pimoe.cli import app

app()
