"""Meta-learning (MAML vs pretrained on sinusoids, few-shot digits) and continual learning (EWC, replay).

Usage: python benchmarks/meta.py [--quick] [--json FILE] [--plot FILE.png]
"""

import argparse
from pathlib import Path

from pimoe.bench.meta import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json, plot_path=args.plot)
