"""Meta-learning (MAML vs pretrained on sinusoids, few-shot digits) and continual learning (EWC, replay).

Same as `pimoe bench meta`, with the same options (`python benchmarks/meta.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "meta", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
