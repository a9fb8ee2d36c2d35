"""Which kernel PiMoE's default experts should use: padded batched matmuls or grouped_mm.

The same PiMoE layer (the shapes, weights and routing of `pimoe bench moe`) runs once with the
dispatcher padding every expert to the largest expert's row count, whatever that wastes (two
batched matmuls), and once on the exact rows (`torch.nn.functional.grouped_mm`), next to HF's
grouped_mm block and the dense limit, the four interleaved within each round. Prints time /
dense limit per contender, the padding (padded rows / routed rows) and what the dispatcher's
rule (`StackedExperts.pad_limit`) picks for that call.

    python benchmarks/moe_padding_vs_grouped_mm.py --tokens 128 512 --rounds 15
"""

import argparse
from collections.abc import Callable

import torch

from pimoe.bench import moe_layer
from pimoe.bench.timing import interleaved_medians, load_average
from pimoe.moe import dispatch
from pimoe.moe.experts import StackedExperts


def with_pad_limit(limit: float | None, step: Callable[[], object]) -> Callable[[], None]:
    """``step`` run with ``StackedExperts.pad_limit`` forced to ``limit`` (and no cap on the
    mean rows per expert when ``limit`` is set)."""
    rule, cap = StackedExperts.pad_limit, dispatch.PAD_MAX_MEAN_ROWS

    def run() -> None:
        StackedExperts.pad_limit = limit
        dispatch.PAD_MAX_MEAN_ROWS = cap if limit is None else 2**62
        try:
            step()
        finally:
            StackedExperts.pad_limit = rule
            dispatch.PAD_MAX_MEAN_ROWS = cap

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
    print(f"{args.threads} threads, 1-min load {load_average():.1f}")
    for name, shape in moe_layer.SHAPES.items():
        layers = moe_layer._contenders(cfg, shape)
        pimoe = layers["pimoe"]
        for tokens in args.tokens:
            x = torch.randn(1, tokens, cfg.d_model)
            with torch.no_grad():
                counts = torch.bincount(pimoe.router(x[0]).indices.flatten(), minlength=shape[0])
            padding = shape[0] * counts.max().item() / counts.sum().item()
            limit, cap = pimoe.experts.pad_limit, dispatch.PAD_MAX_MEAN_ROWS
            rule = (
                "padded"
                if limit and padding <= limit and tokens * shape[1] <= cap * shape[0]
                else "exact"
            )
            for backward in (False, True):
                steps = {
                    key: moe_layer._step(layers[key], x, backward, list(layers[key].parameters()))
                    for key in ("dense", "pimoe", "hf_grouped_mm")
                }
                fns = {
                    "dense": steps["dense"],
                    "pimoe padded": with_pad_limit(float("inf"), steps["pimoe"]),
                    "pimoe grouped_mm": with_pad_limit(None, steps["pimoe"]),
                    "HF grouped_mm": steps["hf_grouped_mm"],
                }
                times = interleaved_medians(fns, args.rounds)
                ratios = "  ".join(
                    f"{key} {times[key] / times['dense']:.2f}" for key in fns if key != "dense"
                )
                mode = "fwd+bwd" if backward else "fwd"
                print(
                    f"{name}  {tokens:>5} tokens  {mode:<7}  padding {padding:.2f} (rule: {rule})"
                    f"  {ratios}  load {load_average():.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
