"""Centralized vs 100-client FedAvg vs FedProx (Flower), IID vs non-IID, 0% and 30% dropout.

Usage: python benchmarks/federated.py [--quick] [--json FILE] [--backend ray|inprocess]
"""

import argparse
from pathlib import Path

from pimoe.bench.federated import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--backend", choices=["ray", "inprocess"], default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json, backend=args.backend)
