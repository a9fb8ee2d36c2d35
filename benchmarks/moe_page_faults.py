"""Page faults and kernel CPU time per training step or forward: PiMoE vs HF grouped_mm vs dense.

The layers of `pimoe bench moe` (same weights) run forward+backward with ``p.grad = None``
before each step (what ``optimizer.zero_grad()`` does), one contender after the other. Prints
per contender the median step time, user and system CPU time per step and minor page faults
per step (``getrusage``). Buffers larger than glibc's mmap threshold (at most 32 MiB; fp32
expert weight gradients of 32-64 MB here) are mapped afresh and faulted in page by page on
every step unless the allocator keeps them; run it again with
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296``
to see every contender without that cost.

    python benchmarks/moe_page_faults.py --shape "E64 k8 f256" --tokens 512 --steps 15

``--no-row-pool`` takes the row buffers from ``malloc`` instead of the kernel's pool;
``--inference`` times forwards under ``torch.inference_mode`` instead of training steps.

    python benchmarks/moe_page_faults.py --inference --steps 15 [--no-row-pool]
"""

import argparse
import resource
import time

import torch

from pimoe.bench.moe_layer import SHAPES, MoEBenchConfig, _contenders, _step
from pimoe.moe import threaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="E64 k8 f256", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-row-pool",
        action="store_true",
        help="row buffers from malloc (pimoe.moe.threaded.set_row_pool(False))",
    )
    parser.add_argument(
        "--inference", action="store_true", help="forwards under torch.inference_mode"
    )
    args = parser.parse_args()
    threaded.set_row_pool(not args.no_row_pool)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = MoEBenchConfig()
    layers = _contenders(cfg, SHAPES[args.shape])
    x = torch.randn(1, args.tokens, cfg.d_model)
    mode = "forward (inference)" if args.inference else "forward+backward"
    print(f"{args.shape}, {args.tokens} tokens, {mode}, {args.threads} threads")
    for name in ("dense", "pimoe", "hf_grouped_mm"):
        step = _step(layers[name], x, not args.inference, list(layers[name].parameters()))
        for _ in range(3):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        n = args.steps
        print(
            f"{name:14s} median {sorted(times)[n // 2] * 1e3:6.1f} ms  "
            f"user {(after.ru_utime - before.ru_utime) / n * 1e3:6.1f} ms  "
            f"sys {(after.ru_stime - before.ru_stime) / n * 1e3:6.1f} ms  "
            f"minor faults {(after.ru_minflt - before.ru_minflt) / n:7.0f} per call"
        )


if __name__ == "__main__":
    main()
