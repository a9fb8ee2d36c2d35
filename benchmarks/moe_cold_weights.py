"""Per-expert matmuls with cold vs reused weights, next to the dense limit's matmuls, on one thread.

The six matmuls of a SwiGLU FFN's forward and backward for 64 experts of 64 rows each (d_model
512, width 256: ``pimoe bench moe``'s 64-experts shape at 512 tokens), ``torch.mm`` per expert:
"cold" gives every expert its own weights (100 MB in all, more than the L3), "reused" runs every
expert on expert 0's weights and gradient buffer (they stay in L2). The dense limit's six
matmuls on 512 tokens of width 2048 run once. Prints the median time and GFLOP/s of each: the
cold / reused gap is the weights' trip from DRAM, which the dense limit (12.6 MB of weights) does
not pay.

    python benchmarks/moe_cold_weights.py --rounds 7
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

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
    for name, (mm, flops) in per_expert.items():
        cold = _time(lambda mm=mm: [mm(e, e) for e in range(E)], args.rounds)
        hot = _time(lambda mm=mm: [mm(e, 0) for e in range(E)], args.rounds)
        total = flops * E / 1e9
        print(
            f"{name:26s} cold {cold * 1e3:6.2f} ({total / cold:5.1f})  "
            f"reused {hot * 1e3:6.2f} ({total / hot:5.1f})"
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
