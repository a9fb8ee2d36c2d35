"""Loopback HTTP load against ``pimoe serve``: one-by-one vs batching vs batching+cache.

Same as `pimoe bench serve`, with the same options (`python benchmarks/serve.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "serve", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
