"""Training's row buffers from the threaded kernel's pool (``threaded.set_row_pool``) on vs off.

Same PiMoE layer, weights and input; off: the experts' gathered inputs, hidden activations,
outputs and their gradients (``[rows, features]``, 1 MiB or more) come from ``malloc``, which
returns them to the system between steps and faults their pages in again on the next; on: from
the pool that already keeps the weight gradients. Only training keeps row buffers in the pool, so
the forward rows (inference) show no difference beyond noise. Shapes of ``pimoe bench moe``
(d_model 512, fp32), interleaved rounds with the dense limit; prints time / dense and on / off.

    python benchmarks/moe_row_pool.py --rounds 15
"""

from pimoe.bench import moe_layer
from pimoe.moe import threaded

moe_layer.compare_setting(__doc__.splitlines()[0], threaded.set_row_pool)
