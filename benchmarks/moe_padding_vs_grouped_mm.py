"""Which kernel PiMoE's default experts should use: padded batched matmuls or grouped_mm.

The same PiMoE layer (the shapes and weights of `pimoe bench moe`) runs once with the dispatcher
padding every expert to the same row count (two batched matmuls) and once on the exact rows
(`torch.nn.functional.grouped_mm`), next to HF's grouped_mm block and the dense limit, the four
interleaved within each round. Prints time / dense limit per contender.

    python benchmarks/moe_padding_vs_grouped_mm.py --tokens 128 512 --rounds 15
"""

import argparse
from collections.abc import Callable

import torch

from pimoe.bench import moe_layer
from pimoe.bench.timing import interleaved_medians, load_average
from pimoe.moe.experts import StackedExperts


def offered_padding(pad: bool, step: Callable[[], object]) -> Callable[[], None]:
    """``step`` run with ``StackedExperts.accepts_padding`` forced to ``pad``."""
    rule = StackedExperts.accepts_padding

    def run() -> None:
        StackedExperts.accepts_padding = pad  # type: ignore[assignment,method-assign]
        try:
            step()
        finally:
            StackedExperts.accepts_padding = rule  # type: ignore[method-assign]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = moe_layer.MoEBenchConfig(threads=args.threads)
    print(f"1-min load {load_average():.1f}")
    for name, shape in moe_layer.SHAPES.items():
        layers = moe_layer._contenders(cfg, shape)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, cfg.d_model)
            for backward in (False, True):
                steps = {
                    key: moe_layer._step(layers[key], x, backward, list(layers[key].parameters()))
                    for key in ("dense", "pimoe", "hf_grouped_mm")
                }
                fns = {
                    "dense": steps["dense"],
                    "pimoe padded": offered_padding(True, steps["pimoe"]),
                    "pimoe grouped_mm": offered_padding(False, steps["pimoe"]),
                    "HF grouped_mm": steps["hf_grouped_mm"],
                }
                times = interleaved_medians(fns, args.rounds)
                ratios = "  ".join(
                    f"{key} {times[key] / times['dense']:.2f}" for key in fns if key != "dense"
                )
                mode = "fwd+bwd" if backward else "fwd"
                print(f"{name}  {tokens:>5} tokens  {mode:<7}  {ratios}", flush=True)
    print(f"1-min load {load_average():.1f}")


if __name__ == "__main__":
    main()
