"""PiMoE computation experts: LM alone vs token-level hand-off vs tool call on held-out arithmetic
with longer operands than in training (accuracy, latency per problem, decoding steps).

Same as `pimoe bench computation`, with the same options (`python benchmarks/computation.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "computation", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
