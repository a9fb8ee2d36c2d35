"""Centralized vs 100-client FedAvg vs FedProx (Flower), IID vs non-IID, 0% and 30% dropout.

Same as `pimoe bench federated`, with the same options (`python benchmarks/federated.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "federated", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
