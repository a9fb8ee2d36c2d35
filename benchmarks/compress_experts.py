"""Expert dropping / merging on a PiMoE digits classifier: test accuracy before and after.

Usage: python benchmarks/compress_experts.py [--quick] [--json FILE]
"""

import argparse
from pathlib import Path

from pimoe.bench.compress_experts import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json)
