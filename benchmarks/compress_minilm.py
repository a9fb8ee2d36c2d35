"""all-MiniLM-L6-v2 compressed by pimoe.compress vs ONNX Runtime dynamic int8: size, cosine, latency.

Usage: python benchmarks/compress_minilm.py [--quick] [--json FILE] [--threads N] [--no-onnx] [--rounds N]
"""

import argparse
from pathlib import Path

from pimoe.bench.compress import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime peer")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json, threads=args.threads, onnx=not args.no_onnx, rounds=args.rounds)
