"""Expert weights prepacked by oneDNN (``pimoe.moe.pack_experts_``) vs the unpacked kernel.

1. Layer: a PiMoE layer's inference forward, unpacked vs packed (the same weights), at few to
   many tokens, for the split SmolLM2's expert shape (d_model 576, 8 experts top-4 of width 192)
   and the 64-experts shape of ``pimoe bench moe`` (d_model 512, top-8 of width 256).
   Prints time per call and packed / unpacked.
2. Matmuls, one thread: every expert's two forward matmuls on ``--rows`` rows (64 experts of
   the bench shape), with MKL (``torch.mm``), on packed weights, and packing each weight anew
   before its matmul (what training would have to do after every optimizer step).

Contenders are interleaved within each round; medians over ``--rounds``.

    python benchmarks/moe_packed.py --rounds 21
"""

import argparse
import copy
from collections.abc import Callable

import torch

from pimoe.bench.timing import interleaved_medians, load_average
from pimoe.moe import MoEConfig, PiMoE, pack_experts_

# name -> (d_model, experts, top_k, width, weight_outputs)
SHAPES = {
    "SmolLM2 split, 8 experts top-4": (576, 8, 4, 192, False),
    "64 experts top-8": (512, 64, 8, 256, True),
}


def _layer_calls(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> None:
        with torch.inference_mode():
            for _ in range(10):
                layer(x)

    return run


def layers(tokens: list[int], rounds: int) -> None:
    for name, (d, experts, top_k, width, weighted) in SHAPES.items():
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=experts, top_k=top_k, ffn_dim=width, weight_outputs=weighted)
        plain = PiMoE(d, cfg)
        packed = copy.deepcopy(plain)
        pack_experts_(packed)
        for t in tokens:
            x = torch.randn(1, t, d)
            times = interleaved_medians(
                {"unpacked": _layer_calls(plain, x), "packed": _layer_calls(packed, x)}, rounds
            )
            ms = {k: v * 100 for k, v in times.items()}  # 10 calls per timing
            print(
                f"{name:32s} {t:5d} tokens: unpacked {ms['unpacked']:.3f} ms, packed "
                f"{ms['packed']:.3f} ms, packed / unpacked {ms['packed'] / ms['unpacked']:.2f}"
            )


def matmuls(rows: int, rounds: int) -> None:
    experts, d, width = 64, 512, 256
    w_in, w_out = torch.randn(experts, 2 * width, d), torch.randn(experts, d, width)
    x, a = torch.randn(rows, d), torch.randn(rows, width)
    reorder, linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    packed = [(reorder(w_in[e], rows), reorder(w_out[e], rows)) for e in range(experts)]

    def mkl() -> None:
        for e in range(experts):
            torch.mm(x, w_in[e].t())
            torch.mm(a, w_out[e].t())

    def on_packed() -> None:
        for p_in, p_out in packed:
            linear(x, p_in, None, "none", [], "")
            linear(a, p_out, None, "none", [], "")

    def pack_each_call() -> None:
        for e in range(experts):
            linear(x, reorder(w_in[e], rows), None, "none", [], "")
            linear(a, reorder(w_out[e], rows), None, "none", [], "")

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    times = interleaved_medians(
        {"mkl": mkl, "packed": on_packed, "pack each call": pack_each_call}, rounds
    )
    torch.set_num_threads(before)
    print(f"64 experts x 2 forward matmuls on {rows} rows, 1 thread (time / MKL):")
    for key, value in times.items():
        print(f"  {key:15s} {value * 1e3:7.2f} ms  {value / times['mkl']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 512])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, 1-min load {load_average():.1f}")
    layers(args.tokens, args.rounds)
    matmuls(args.rows, args.rounds)
    print(f"1-min load {load_average():.1f}")


if __name__ == "__main__":
    main()
