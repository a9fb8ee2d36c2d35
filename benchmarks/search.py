"""Multi-objective architecture search (Optuna TPE) vs random search at equal budget: hypervolume
of the Pareto fronts (held-out loss, CPU latency, bytes) and the performance predictor's Spearman rho.

Same as `pimoe bench search`, with the same options (`python benchmarks/search.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "search", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
