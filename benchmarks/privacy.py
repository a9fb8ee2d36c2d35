"""DP-SGD accuracy at epsilon 1/3/8 vs non-private, secure aggregation and CKKS aggregation costs (sklearn digits).

Usage: python benchmarks/privacy.py [--quick] [--json FILE]
"""

import argparse
from pathlib import Path

from pimoe.bench.privacy import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json)
