"""Per-expert matmuls with cold vs reused weights, next to the dense limit's matmuls, on one thread.

The six matmuls of a SwiGLU FFN's forward and backward for 64 experts of 64 rows each (d_model
512, width 256: ``pimoe bench moe``'s 64-experts shape at 512 tokens), ``torch.mm`` per expert:
"cold" gives every expert its own weights (100 MB in all, more than the L3), "reused" runs every
expert on expert 0's weights and gradient buffer (they stay in L2). The dense limit's six
matmuls on 512 tokens of width 2048 run once. Prints the median time and GFLOP/s of each: the
cold / reused gap is the weights' trip from DRAM, which the dense limit (12.6 MB of weights) does
not pay. Where the CPU has AVX-512, the same six products on pimoe's own kernel
(``threaded.loaded_kernel().avx512_mm_out``, :mod:`pimoe.moe.gemm_source`) follow, the forward's
computed transposed as the threaded kernel does (``W @ x^T``; the transposes of the rows, a few
percent of the kernel's time, are not in these times).

    python benchmarks/moe_cold_weights.py --rounds 7
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pimoe.moe import threaded

E, ROWS, D, F = 64, 64, 512, 256
T, WIDTH = 512, 8 * 256


def _time(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cold_vs_reused(
    per_expert: dict[str, tuple[Callable[[int, int], object], int]], rounds: int
) -> None:
    """Times ``mm(e, e)`` (expert e on its own weights) and ``mm(e, 0)`` (on expert 0's) over
    all experts, for each product."""
    for name, (mm, flops) in per_expert.items():
        cold = _time(lambda mm=mm: [mm(e, e) for e in range(E)], rounds)
        hot = _time(lambda mm=mm: [mm(e, 0) for e in range(E)], rounds)
        total = flops * E / 1e9
        print(
            f"{name:26s} cold {cold * 1e3:6.2f} ({total / cold:5.1f})  "
            f"reused {hot * 1e3:6.2f} ({total / hot:5.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, g = torch.randn(E, ROWS, D), torch.randn(E, ROWS, D)
    a, gh = torch.randn(E, ROWS, F), torch.randn(E, ROWS, 2 * F)
    w_in, w_out = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    grad_w_in, grad_w_out = torch.empty(E, 2 * F, D), torch.empty(E, D, F)
    per_expert: dict[str, tuple[Callable[[int, int], object], int]] = {
        "fwd x @ w_in.T": (lambda e, w: torch.mm(x[e], w_in[w].t()), 2 * ROWS * D * 2 * F),
        "fwd a @ w_out.T": (lambda e, w: torch.mm(a[e], w_out[w].t()), 2 * ROWS * F * D),
        "bwd g @ w_out": (lambda e, w: torch.mm(g[e], w_out[w]), 2 * ROWS * D * F),
        "bwd g.T @ a (grad w_out)": (
            lambda e, w: torch.mm(g[e].t(), a[e], out=grad_w_out[w]),
            2 * ROWS * D * F,
        ),
        "bwd gh.T @ x (grad w_in)": (
            lambda e, w: torch.mm(gh[e].t(), x[e], out=grad_w_in[w]),
            2 * ROWS * 2 * F * D,
        ),
        "bwd gh @ w_in": (lambda e, w: torch.mm(gh[e], w_in[w]), 2 * ROWS * 2 * F * D),
    }
    print(f"1 thread, {E} experts of {ROWS} rows: ms (GFLOP/s)")
    _cold_vs_reused(per_expert, args.rounds)
    if threaded.expert_matmul() == "avx512" and threaded.threaded_kernel() is not None:
        mm_out = threaded.loaded_kernel().avx512_mm_out
        x_t, a_t = x.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous()
        h_t, y_t = torch.empty(E, 2 * F, ROWS), torch.empty(E, D, ROWS)
        grad_a, grad_x = torch.empty(E, ROWS, F), torch.empty(E, ROWS, D)
        print("the same on the own AVX-512 kernel")
        _cold_vs_reused(
            {
                "fwd W_in @ x.T": (
                    lambda e, w: mm_out(h_t[e], w_in[w], x_t[e]),
                    per_expert["fwd x @ w_in.T"][1],
                ),
                "fwd W_out @ a.T": (
                    lambda e, w: mm_out(y_t[e], w_out[w], a_t[e]),
                    per_expert["fwd a @ w_out.T"][1],
                ),
                "bwd g @ w_out": (
                    lambda e, w: mm_out(grad_a[e], g[e], w_out[w]),
                    per_expert["bwd g @ w_out"][1],
                ),
                "bwd g.T @ a (grad w_out)": (
                    lambda e, w: mm_out(grad_w_out[w], g[e].t(), a[e]),
                    per_expert["bwd g.T @ a (grad w_out)"][1],
                ),
                "bwd gh.T @ x (grad w_in)": (
                    lambda e, w: mm_out(grad_w_in[w], gh[e].t(), x[e]),
                    per_expert["bwd gh.T @ x (grad w_in)"][1],
                ),
                "bwd gh @ w_in": (
                    lambda e, w: mm_out(grad_x[e], gh[e], w_in[w]),
                    per_expert["bwd gh @ w_in"][1],
                ),
            },
            args.rounds,
        )
    xs, gs, h = torch.randn(T, D), torch.randn(T, D), torch.randn(T, 2 * WIDTH)
    act = torch.randn(T, WIDTH)
    w1, w2 = torch.randn(2 * WIDTH, D), torch.randn(D, WIDTH)
    dense = {
        "fwd x @ w_in.T": (lambda: torch.mm(xs, w1.t()), 2 * T * D * 2 * WIDTH),
        "fwd a @ w_out.T": (lambda: torch.mm(act, w2.t()), 2 * T * WIDTH * D),
        "bwd g @ w_out": (lambda: torch.mm(gs, w2), 2 * T * D * WIDTH),
        "bwd g.T @ a (grad w_out)": (lambda: torch.mm(gs.t(), act), 2 * T * D * WIDTH),
        "bwd gh.T @ x (grad w_in)": (lambda: torch.mm(h.t(), xs), 2 * T * 2 * WIDTH * D),
        "bwd gh @ w_in": (lambda: torch.mm(h, w1), 2 * T * 2 * WIDTH * D),
    }
    print(f"dense limit, {T} tokens of width {WIDTH}")
    for name, (fn, flops) in dense.items():
        seconds = _time(fn, args.rounds)
        print(f"{name:26s}      {seconds * 1e3:6.2f} ({flops / 1e9 / seconds:5.1f})")


if __name__ == "__main__":
    main()
