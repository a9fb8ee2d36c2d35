"""DP-SGD accuracy at epsilon 1/3/8 vs non-private, secure aggregation and CKKS aggregation costs (sklearn digits).

Same as `pimoe bench privacy`, with the same options (`python benchmarks/privacy.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "privacy", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
