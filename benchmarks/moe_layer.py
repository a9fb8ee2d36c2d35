"""PiMoE layer vs HF MixtralSparseMoeBlock vs the dense limit. Same as `pimoe bench moe`.

Same as `pimoe bench moe`, with the same options (`python benchmarks/moe_layer.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "moe", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
