"""The combine's fused CPU ops (``threaded.gather_sum``, ``threaded.combine_grad_rows``) on vs off.

Same PiMoE layer, weights and input; the only difference between the two contenders is
``pimoe.moe.dispatch.gather_sum_usable`` (off: the combine's forward is ``index_select`` + ``bmm``,
its backward one ``[R, D]`` gather, a multiply and a batched dot product, the gather's backward
``index_select`` + ``sum``). Shapes of ``pimoe bench moe`` (d_model 512, fp32), interleaved
rounds with the dense limit; prints time / dense and on / off.

    python benchmarks/moe_combine_ops.py --rounds 15
"""

from collections.abc import Callable

import torch

from pimoe.bench import moe_layer
from pimoe.bench.timing import interleaved_medians, load_average
from pimoe.moe import dispatch

args, shapes = moe_layer.script_shapes(__doc__.splitlines()[0], [128, 512], 15)
real = dispatch.gather_sum_usable


def _with_ops(run: Callable[[], object], on: bool) -> Callable[[], None]:
    def step() -> None:
        dispatch.gather_sum_usable = real if on else (lambda src: False)
        run()

    return step


for name, _, contenders in shapes:
    dense, layer = contenders["dense"], contenders["pimoe"]
    for tokens in args.tokens:
        x = torch.randn(1, tokens, 512)
        for backward in (False, True):
            base = moe_layer._step(layer, x, backward, list(layer.parameters()))
            times = interleaved_medians(
                {
                    "dense": moe_layer._step(dense, x, backward, list(dense.parameters())),
                    "off": _with_ops(base, False),
                    "on": _with_ops(base, True),
                },
                args.rounds,
            )
            off, on = times["off"] / times["dense"], times["on"] / times["dense"]
            mode = "fwd+bwd" if backward else "fwd"
            print(f"{name} {tokens:5d} {mode:8s} off {off:.3f} on {on:.3f} on/off {on / off:.3f}")
dispatch.gather_sum_usable = real
print(f"1-min load {load_average():.1f}")
