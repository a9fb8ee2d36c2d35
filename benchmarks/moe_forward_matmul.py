"""The threaded kernel's float32 forward matmuls on oneDNN vs MKL (``threaded.expert_matmul``).

Same PiMoE layer, weights and input; the only difference between the two contenders is
``pimoe.moe.threaded.set_expert_matmul`` (``"mkl"``: ``at::mm``, ``"onednn"``: oneDNN's matmul
on the same plain weights; the backward's matmuls are ``at::mm`` in both). Shapes of
``pimoe bench moe`` (d_model 512, fp32), interleaved rounds with the dense limit; prints time /
dense and onednn / mkl.

    python benchmarks/moe_forward_matmul.py --rounds 15
"""

from pimoe.bench import moe_layer
from pimoe.moe import threaded

moe_layer.compare_setting(
    __doc__.splitlines()[0],
    lambda on: threaded.set_expert_matmul("onednn" if on else "mkl"),
    ("mkl", "onednn"),
)
