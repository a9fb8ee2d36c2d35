"""Which kernel PiMoE's default experts should use: padded batched matmuls, the threaded
experts kernel or grouped_mm.

The same PiMoE layer (the shapes, weights and routing of `pimoe bench moe`) runs once with the
dispatcher padding every expert to the largest expert's row count, whatever that wastes (two
batched matmuls), once on the exact rows with the threaded experts kernel
(`pimoe.moe.threaded`, whole experts per thread, whatever `threaded_pays` says) and once on the exact rows with
`torch.nn.functional.grouped_mm`, next to HF's grouped_mm block and the dense limit, the five
interleaved within each round. Prints time /
dense limit per contender, the padding (padded rows / routed rows) and what the dispatcher's
rule (`StackedExperts.pad_limit`) picks for that call.

    python benchmarks/moe_padding_vs_grouped_mm.py --tokens 128 512 --rounds 15
"""

from collections.abc import Callable

import torch

from pimoe.bench import moe_layer
from pimoe.bench.timing import interleaved_medians, load_average
from pimoe.moe import dispatch, grouped, threaded
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


def without_threaded_kernel(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` run as if the threaded experts kernel could not be built (``grouped_mm`` runs
    the exact rows instead)."""

    def run() -> None:
        state = dict(threaded._state)
        threaded._state["module"] = None
        try:
            step()
        finally:
            threaded._state.clear()
            threaded._state.update(state)

    return run


def forced_threaded(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` run with the threaded experts kernel on every grouped FFN call (its rule,
    ``threaded_pays``, switched off)."""

    def run() -> None:
        rule = grouped.threaded_pays
        grouped.threaded_pays = lambda splits: True
        try:
            step()
        finally:
            grouped.threaded_pays = rule

    return run


def main() -> None:
    args, shapes = moe_layer.script_shapes(__doc__.splitlines()[0], [128, 512], 15)
    print(f"threaded experts kernel: {threaded.threaded_kernel() is not None}")
    for name, shape, layers in shapes:
        pimoe = layers["pimoe"]
        for tokens in args.tokens:
            x = torch.randn(1, tokens, moe_layer.MoEBenchConfig.d_model)
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
                    "pimoe threaded": forced_threaded(with_pad_limit(None, steps["pimoe"])),
                    "pimoe grouped_mm": without_threaded_kernel(
                        with_pad_limit(None, steps["pimoe"])
                    ),
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
