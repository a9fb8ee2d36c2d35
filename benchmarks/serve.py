"""Loopback HTTP load against ``pimoe serve``: one-by-one vs batching vs batching+cache.

Usage: python benchmarks/serve.py [--quick] [--json FILE]
"""

import argparse
from pathlib import Path

from pimoe.bench.serve import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json)
