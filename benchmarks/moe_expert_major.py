"""Inference of many tokens: PiMoE's expert-major forward vs gathering every routed row first.

The same PiMoE layer (the shapes, weights and routing of `pimoe bench moe`) runs its forward
under `torch.inference_mode` once as the dispatcher chooses (expert by expert from gather to
weighted sum, `StackedExperts.expert_major`, once all rows' hidden activations would reach
`EXPERT_MAJOR_MIN_BYTES`; on several threads the threaded kernel's `expert_major_forward`),
once forced expert by expert, once as the per-expert Python loop the threaded call replaces,
and once forced onto the gathered path
(gather all rows, grouped kernel, combine), next to HF's eager and grouped_mm blocks and the
dense limit, interleaved within each round. Prints time / dense limit per contender.

    python benchmarks/moe_expert_major.py --tokens 1024 2048 16384 --rounds 3
"""

from collections.abc import Callable

import torch

from pimoe.bench import moe_layer
from pimoe.bench.timing import interleaved_medians, load_average
from pimoe.moe import experts, grouped


def with_rule(step: Callable[[], object], min_bytes: int) -> Callable[[], None]:
    """``step`` run with both expert-major thresholds set to ``min_bytes`` (0: always expert
    by expert; 2**62: never, the gathered path)."""

    def run() -> None:
        rules = experts.EXPERT_MAJOR_MIN_BYTES, experts.EXPERT_MAJOR_MIN_HIDDEN_BYTES
        experts.EXPERT_MAJOR_MIN_BYTES = experts.EXPERT_MAJOR_MIN_HIDDEN_BYTES = min_bytes
        try:
            step()
        finally:
            experts.EXPERT_MAJOR_MIN_BYTES, experts.EXPERT_MAJOR_MIN_HIDDEN_BYTES = rules

    return run


def python_loop(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` with the expert-major forward as the per-expert Python loop (the threaded
    kernel's ``expert_major_forward`` switched off)."""

    def run() -> None:
        usable = grouped.threaded_usable
        grouped.threaded_usable = lambda *args: False  # type: ignore[assignment]
        try:
            step()
        finally:
            grouped.threaded_usable = usable

    return run


def main() -> None:
    args, shapes = moe_layer.script_shapes(__doc__.splitlines()[0], [1024, 2048, 16384], 3)
    for name, shape, layers in shapes:
        for tokens in args.tokens:
            x = torch.randn(1, tokens, moe_layer.MoEBenchConfig.d_model)
            chosen = layers["pimoe"].experts.runs_expert_major(tokens * shape[1])
            steps = {key: moe_layer._step(m, x, False, []) for key, m in layers.items()}
            fns = {
                "dense": steps["dense"],
                "pimoe default": steps["pimoe"],
                "pimoe expert-major": with_rule(steps["pimoe"], 0),
                "pimoe python loop": python_loop(with_rule(steps["pimoe"], 0)),
                "pimoe gathered": with_rule(steps["pimoe"], 2**62),
                "HF eager": steps["hf_eager"],
                "HF grouped_mm": steps["hf_grouped_mm"],
            }
            times = interleaved_medians(fns, args.rounds)
            ratios = "  ".join(
                f"{key} {times[key] / times['dense']:.2f}" for key in fns if key != "dense"
            )
            print(
                f"{name}  {tokens:>5} tokens  fwd  expert-major: {chosen}  "
                f"dense {times['dense'] * 1e3:.0f} ms  {ratios}  load {load_average():.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
