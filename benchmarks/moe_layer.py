"""PiMoE layer vs HF MixtralSparseMoeBlock vs the dense limit. Same as `pimoe bench moe`.

Usage: python benchmarks/moe_layer.py [--quick] [--json FILE]
"""

import argparse
from pathlib import Path

from pimoe.bench.moe_layer import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json, rounds=args.rounds, threads=args.threads)
