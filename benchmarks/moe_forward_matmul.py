"""The threaded kernel's float32 forward matmuls on oneDNN vs MKL (``threaded.forward_matmul``).

Same PiMoE layer, weights and input; the only difference between the two contenders is
``pimoe.moe.threaded.set_forward_matmul`` (``"mkl"``: ``at::mm``, ``"onednn"``: oneDNN's matmul
on the same plain weights; the backward's matmuls are ``at::mm`` in both). Shapes of
``pimoe bench moe`` (d_model 512, fp32), interleaved rounds with the dense limit; prints time /
dense and onednn / mkl.

    python benchmarks/moe_forward_matmul.py --rounds 15
"""

from collections.abc import Callable

import torch

from pimoe.bench import moe_layer
from pimoe.bench.timing import interleaved_medians, load_average
from pimoe.moe import threaded

args, shapes = moe_layer.script_shapes(__doc__.splitlines()[0], [128, 512], 15)
before = threaded.forward_matmul()


def _with_ops(run: Callable[[], object], on: bool) -> Callable[[], None]:
    def step() -> None:
        threaded.set_forward_matmul("onednn" if on else "mkl")
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
            print(
                f"{name} {tokens:5d} {mode:8s} mkl {off:.3f} onednn {on:.3f} onednn/mkl {on / off:.3f}"
            )
threaded.set_forward_matmul(before)
print(f"1-min load {load_average():.1f}")
