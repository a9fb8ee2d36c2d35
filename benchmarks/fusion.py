"""Sensor fusion on digits halves (each sensor alone vs each fusion method) and contrastive retrieval.

Same as `pimoe bench fusion`, with the same options (`python benchmarks/fusion.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "fusion", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
