"""Expert dropping / merging on a PiMoE digits classifier: test accuracy before and after.

Same as `pimoe bench compress-experts`, with the same options (`python benchmarks/compress_experts.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "compress-experts", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
