"""Cache policies vs Belady's MIN on seeded Zipf traces; cost of hits, misses and disk hits.

Same as `pimoe bench cache`, with the same options (`python benchmarks/cache.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "cache", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
