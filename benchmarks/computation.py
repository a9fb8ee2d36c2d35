"""PiMoE computation experts: LM alone vs token-level hand-off vs tool call on held-out arithmetic
with longer operands than in training (accuracy, latency per problem, decoding steps).

Usage: python benchmarks/computation.py [--quick] [--json FILE] [--threads N] [--calls reference|expression]
"""

import argparse
from pathlib import Path

from pimoe.bench.computation import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", choices=["reference", "expression"], default="reference",
                        help="what the text expert writes in a span: #k references or the digits")
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json, threads=args.threads, calls=args.calls)
