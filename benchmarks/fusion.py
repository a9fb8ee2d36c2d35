"""Sensor fusion on digits halves (each sensor alone vs each fusion method) and contrastive retrieval.

Usage: python benchmarks/fusion.py [--quick] [--json FILE]
"""

import argparse
from pathlib import Path

from pimoe.bench.fusion import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json)
