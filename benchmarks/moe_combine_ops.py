"""The combine's fused CPU ops (``combine_ops.gather_sum``, ``combine_ops.combine_grad_rows``) on vs off.

Same PiMoE layer, weights and input; the only difference between the two contenders is
``pimoe.moe.dispatch.gather_sum_usable`` (off: the combine's forward is ``index_select`` + ``bmm``,
its backward one ``[R, D]`` gather, a multiply and a batched dot product, the gather's backward
``index_select`` + ``sum``). Shapes of ``pimoe bench moe`` (d_model 512, fp32), interleaved
rounds with the dense limit; prints time / dense and on / off.

    python benchmarks/moe_combine_ops.py --rounds 15
"""

from pimoe.bench import moe_layer
from pimoe.moe import dispatch

real = dispatch.gather_sum_usable


def _switch(on: bool) -> None:
    dispatch.gather_sum_usable = real if on else (lambda src: False)


moe_layer.compare_setting(__doc__.splitlines()[0], _switch)
