"""Multi-objective architecture search (Optuna TPE) vs random search at equal budget: hypervolume
of the Pareto fronts (held-out loss, CPU latency, bytes) and the performance predictor's Spearman rho.

Usage: python benchmarks/search.py [--quick] [--json FILE] [--seeds N]
"""

import argparse
from pathlib import Path

from pimoe.bench.search import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json, seeds=args.seeds)
