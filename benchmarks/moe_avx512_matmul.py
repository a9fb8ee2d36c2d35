"""The threaded kernel's own AVX-512 matmul vs the previous default (oneDNN forward, MKL backward).

Same PiMoE layer, weights and input; the only difference between the two contenders is
``pimoe.moe.threaded.set_expert_matmul`` (``"onednn"``: oneDNN's matmul in the forward, ``at::mm``
in the backward; ``"avx512"``: the kernel of :mod:`pimoe.moe.gemm_source` for every float32
matmul of the forward and the backward). Shapes of ``pimoe bench moe`` (d_model 512, fp32),
rotated interleaved rounds with the dense limit; prints time / dense and avx512 / onednn.
Needs a CPU with AVX-512.

    python benchmarks/moe_avx512_matmul.py --rounds 15 --tokens 128 512 2048 16384
"""

from pimoe.bench import moe_layer
from pimoe.moe import threaded

moe_layer.compare_setting(
    __doc__.splitlines()[0],
    lambda on: threaded.set_expert_matmul("avx512" if on else "onednn"),
    ("onednn", "avx512"),
)
