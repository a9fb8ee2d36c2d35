"""Expert parallelism on 1, 2, 4 local gloo processes vs the single-process layer. Same as
`pimoe bench expert-parallel`.

Usage: python benchmarks/expert_parallel.py [--quick] [--json FILE] [--rounds N]
"""

import argparse
from pathlib import Path

from pimoe.bench.expert_parallel import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    main(quick=args.quick, json_path=args.json, rounds=args.rounds)
