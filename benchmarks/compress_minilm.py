"""all-MiniLM-L6-v2 compressed by pimoe.compress vs ONNX Runtime dynamic int8: size, cosine, latency.

Same as `pimoe bench compress`, with the same options (`python benchmarks/compress_minilm.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "compress", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
