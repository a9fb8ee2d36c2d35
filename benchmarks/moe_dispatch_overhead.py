"""Per-call overhead of PiMoE's routing and dispatch next to HF's grouped_mm MoE block.

Two measurements on the shapes of `pimoe bench moe` (same weights, same routing, fp32):

- ``overhead``: the layers at d_model 64 and expert width 32, where the expert matmuls cost
  almost nothing, so the time per call is the router, sort, gather, combine, Python and
  autograd overhead. PiMoE, HF grouped_mm and the dense limit run interleaved, one call each
  per round; the minimum and the median over the rounds are printed.
- ``--profile``: ``torch.profiler`` (record_shapes) of the real-width layers, microseconds of
  self CPU time per call for each op and input shape, PiMoE then HF.

    python benchmarks/moe_dispatch_overhead.py --tokens 128 --rounds 300 --threads 1 2
    python benchmarks/moe_dispatch_overhead.py --tokens 128 --profile --threads 1
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pimoe.bench import moe_layer
from pimoe.bench.timing import load_average

CONTENDERS = ("dense", "pimoe", "hf_grouped_mm")


def _layers(d_model: int, shape: tuple[int, int, int]) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    layers = moe_layer._contenders(moe_layer.MoEBenchConfig(d_model=d_model), shape)
    return {key: layers[key] for key in CONTENDERS}


def _steps(
    layers: dict[str, torch.nn.Module], x: torch.Tensor, backward: bool
) -> dict[str, Callable[[], object]]:
    return {k: moe_layer._step(m, x, backward, list(m.parameters())) for k, m in layers.items()}


def overhead(tokens: int, rounds: int) -> None:
    """Print min / median microseconds per call of each contender at tiny widths."""
    for name, (experts, top_k, _) in moe_layer.SHAPES.items():
        layers = _layers(64, (experts, top_k, 32))
        x = torch.randn(1, tokens, 64)
        for backward in (False, True):
            fns = _steps(layers, x, backward)
            samples: dict[str, list[float]] = {key: [] for key in fns}
            for fn in fns.values():
                for _ in range(10):
                    fn()
            for _ in range(rounds):
                for key, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    samples[key].append((time.perf_counter() - start) * 1e6)
            cells = "  ".join(
                f"{key} {min(s):7.1f} / {statistics.median(s):7.1f}" for key, s in samples.items()
            )
            mode = "fwd+bwd" if backward else "fwd"
            print(
                f"{name}  {tokens:>5} tokens  {mode:<7}  us min / median: {cells}  load "
                f"{load_average():.1f}",
                flush=True,
            )


def profile(tokens: int, calls: int, limit: int) -> None:
    """Print each op's self CPU microseconds per call (by input shape), PiMoE then HF."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, shape in moe_layer.SHAPES.items():
        layers = _layers(512, shape)
        x = torch.randn(1, tokens, 512)
        for backward in (False, True):
            for key, fn in _steps(layers, x, backward).items():
                if key == "dense":
                    continue
                for _ in range(3):
                    fn()
                with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    for _ in range(calls):
                        fn()
                events = prof.key_averages(group_by_input_shape=True)
                total = sum(e.self_cpu_time_total for e in events) / calls
                mode = "fwd+bwd" if backward else "fwd"
                print(
                    f"== {key} {name} {tokens} tokens {mode}: {total:.0f} us self CPU per "
                    f"call, load {load_average():.1f}"
                )
                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:limit]:
                    print(
                        f"{e.self_cpu_time_total / calls:9.1f} us {e.count / calls:4.1f}x "
                        f"{e.key[:36]:36s} {str(e.input_shapes)[:70]}"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--profile", action="store_true", help="op table at the real widths")
    parser.add_argument("--calls", type=int, default=10, help="profiled calls (--profile)")
    parser.add_argument("--ops", type=int, default=25, help="ops listed (--profile)")
    args = parser.parse_args()
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{threads} threads, 1-min load {load_average():.1f}")
        for tokens in args.tokens:
            if args.profile:
                profile(tokens, args.calls, args.ops)
            else:
                overhead(tokens, args.rounds)


if __name__ == "__main__":
    main()
