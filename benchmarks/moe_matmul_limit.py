"""How close to the dense limit can a MoE layer get on this CPU? Its matmuls alone, next to the
dense limit's matmuls.

For each shape of `pimoe bench moe` (d_model 512, fp32) at T tokens, every expert gets exactly
T * top_k / E rows (perfect balance, a best case) and the threaded kernel runs only the
per-expert matmuls of a SwiGLU FFN: forward ``x_e @ W_in[e].T`` and ``a_e @ W_out[e].T``;
backward ``g_e @ W_out[e]``, ``g_e.T @ a_e``, ``gh_e.T @ x_e``, ``gh_e @ W_in[e]``
(``pimoe.moe.threaded.rows_mm`` / ``weights_mm``: whole experts per thread). The dense contender
runs the same six matmuls once over all T tokens with width ``top_k * ffn`` (torch.mm on all
threads). No routing, gather, activation or combine: the ratio is what the per-expert matmuls
cost over the dense ones, a floor for the whole layer's ratio in `pimoe bench moe`.
Interleaved rounds; prints time / dense per mode.

    python benchmarks/moe_matmul_limit.py --tokens 512 --rounds 15
"""

import argparse
from collections.abc import Callable

import torch

from pimoe.bench.moe_layer import SHAPES, MoEBenchConfig
from pimoe.bench.timing import interleaved_medians, load_average
from pimoe.moe.threaded import rows_mm, threaded_kernel, weights_mm


def _per_expert(
    tokens: int, d: int, experts: int, top_k: int, width: int
) -> dict[str, Callable[[], object]]:
    rows = tokens * top_k // experts
    splits = [rows] * experts
    n = rows * experts
    x, g = torch.randn(n, d), torch.randn(n, d)
    a, gh = torch.randn(n, width), torch.randn(n, 2 * width)
    w_in, w_out = torch.randn(experts, 2 * width, d), torch.randn(experts, d, width)

    def forward() -> None:
        rows_mm(x, w_in.transpose(1, 2), splits)
        rows_mm(a, w_out.transpose(1, 2), splits)

    def backward() -> None:
        rows_mm(g, w_out, splits)
        weights_mm(g, a, splits)
        weights_mm(gh, x, splits)
        rows_mm(gh, w_in, splits)

    return {"fwd": forward, "bwd": backward}


def _dense(tokens: int, d: int, width: int) -> dict[str, Callable[[], object]]:
    x, g = torch.randn(tokens, d), torch.randn(tokens, d)
    a, gh = torch.randn(tokens, width), torch.randn(tokens, 2 * width)
    w_in, w_out = torch.randn(2 * width, d), torch.randn(d, width)

    def forward() -> None:
        torch.mm(x, w_in.t())
        torch.mm(a, w_out.t())

    def backward() -> None:
        torch.mm(g, w_out)
        torch.mm(g.t(), a)
        torch.mm(gh.t(), x)
        torch.mm(gh, w_in)

    return {"fwd": forward, "bwd": backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if threaded_kernel() is None:
        raise SystemExit("the threaded kernel could not be built here")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    d = MoEBenchConfig.d_model
    print(f"{args.threads} threads, 1-min load {load_average():.1f}")
    for name, (experts, top_k, width) in SHAPES.items():
        for tokens in args.tokens:
            moe = _per_expert(tokens, d, experts, top_k, width)
            dense = _dense(tokens, d, top_k * width)
            with torch.inference_mode():
                times = interleaved_medians(
                    {
                        "moe fwd": moe["fwd"],
                        "dense fwd": dense["fwd"],
                        "moe bwd": moe["bwd"],
                        "dense bwd": dense["bwd"],
                    },
                    args.rounds,
                )
            fwd = times["moe fwd"] / times["dense fwd"]
            both = (times["moe fwd"] + times["moe bwd"]) / (times["dense fwd"] + times["dense bwd"])
            print(
                f"{name} {tokens} tokens: matmuls / dense matmuls fwd {fwd:.2f}, fwd+bwd {both:.2f} "
                f"(dense fwd {times['dense fwd'] * 1e3:.1f} ms, bwd {times['dense bwd'] * 1e3:.1f} ms; "
                f"load {load_average():.1f})"
            )


if __name__ == "__main__":
    main()
