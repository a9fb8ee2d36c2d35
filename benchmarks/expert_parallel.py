"""Expert parallelism on 1, 2, 4 local gloo processes vs the single-process layer. Same as
`pimoe bench expert-parallel`.

Same as `pimoe bench expert-parallel`, with the same options (`python benchmarks/expert_parallel.py --help`).
"""

import sys

from pimoe.cli import app

if __name__ == "__main__":
    app(["bench", "expert-parallel", *sys.argv[1:]], prog_name=f"python {sys.argv[0]}")
