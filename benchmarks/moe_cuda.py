"""PiMoE's MoE layer on a GPU vs Hugging Face's MoE block (eager, grouped_mm) and the dense limit.

The CUDA counterpart of ``pimoe bench moe`` (which measures 2 CPU threads): the same contenders
share one set of weights (``PiMoE.from_hf(block)``), run in bf16 on one GPU, once per round in
turn (interleaved), each call timed on the host from launch to ``torch.cuda.synchronize()`` (so
launch and host-sync overheads count, as they do for a caller). Ratios are medians over rounds
against the dense limit (one SwiGLU of width ``top_k * ffn_dim`` on every token). Contenders:
``pimoe`` (PiMoE layer, ``backend="auto"``: grouped_mm for bf16 on CUDA), ``hf_pimoe`` (the HF
block with ``experts_implementation="pimoe"``), ``hf_grouped_mm`` and ``hf_eager`` (HF's own).

    python benchmarks/moe_cuda.py --json moe_cuda.json            # needs a CUDA GPU
    python benchmarks/moe_cuda.py --device cpu --dtype float32 --shapes "E8 k2 f1024 d512" --tokens 64 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pimoe.bench.moe_layer import _hf_block
from pimoe.hf import enable
from pimoe.moe import PiMoE, SwiGLU

# name -> (d_model, experts, top_k, expert width)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "E8 k2 f1024 d512": (512, 8, 2, 1024),
    "E64 k8 f256 d512": (512, 64, 8, 256),
    "E64 k8 f1024 d2048 (OLMoE)": (2048, 64, 8, 1024),
    "E8 k2 f14336 d4096 (Mixtral)": (4096, 8, 2, 14336),
}
EAGER_MAX_TOKENS_BWD = 2048


def contenders(
    shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype
) -> dict[str, nn.Module]:
    """Dense limit, PiMoE and the three HF blocks, all with the same expert and router weights."""
    enable()
    d_model, experts, top_k, width = shape
    eager = _hf_block(d_model, (experts, top_k, width), "eager")
    for p in eager.parameters():
        nn.init.normal_(p, std=0.02)
    blocks = {"hf_eager": eager}
    for name, implementation in (("hf_grouped_mm", "grouped_mm"), ("hf_pimoe", "pimoe")):
        blocks[name] = _hf_block(d_model, (experts, top_k, width), implementation)
        blocks[name].load_state_dict(eager.state_dict())
    mods = {"dense": SwiGLU(d_model, top_k * width), "pimoe": PiMoE.from_hf(eager), **blocks}
    return {k: m.to(device, dtype) for k, m in mods.items()}


def _step(module: nn.Module, x: torch.Tensor, backward: bool, sync: Callable[[], None]):
    params = list(module.parameters())

    def run() -> float:
        for p in params:
            p.grad = None
        start = time.perf_counter()
        if backward:
            out = module(x.detach().requires_grad_())
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        else:
            with torch.inference_mode():
                module(x)
        sync()
        return time.perf_counter() - start

    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    rows = []
    for name in args.shapes:
        mods = contenders(SHAPES[name], device, dtype)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, SHAPES[name][0], device=device, dtype=dtype)
            with torch.inference_mode():
                ours = mods["pimoe"](x).float()
                diff = {
                    k: ((ours - mods[k](x)[0].float()).norm() / ours.norm()).item()
                    for k in ("hf_eager", "hf_grouped_mm", "hf_pimoe")
                }
            for backward in (False, True):
                fns = {
                    k: _step(m, x, backward, sync)
                    for k, m in mods.items()
                    if k != "hf_eager" or not backward or tokens <= EAGER_MAX_TOKENS_BWD
                }
                for fn in fns.values():  # warm-up (kernel selection, allocator)
                    fn(), fn()
                samples: dict[str, list[float]] = {k: [] for k in fns}
                for _ in range(args.rounds):
                    for k, fn in fns.items():
                        samples[k].append(fn())
                ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
                row = {
                    "shape": name,
                    "tokens": tokens,
                    "mode": "fwd+bwd" if backward else "fwd",
                    "dense_ms": ms["dense"],
                    **{f"{k}_vs_dense": ms[k] / ms["dense"] for k in ms if k != "dense"},
                    "pimoe_vs_best_hf": ms["pimoe"]
                    / min(ms[k] for k in ("hf_eager", "hf_grouped_mm") if k in ms),
                    "rel_diff_vs_pimoe": diff,
                }
                rows.append(row)
                print(
                    f"{name:30s} {tokens:6d} {row['mode']:8s} dense {ms['dense']:8.3f} ms  "
                    + "  ".join(f"{k} {ms[k] / ms['dense']:6.2f}" for k in ms if k != "dense")
                    + f"  pimoe/bestHF {row['pimoe_vs_best_hf']:.2f}",
                    flush=True,
                )
        del mods
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "benchmark": "moe_cuda",
        "device": gpu,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "worst_pimoe_vs_best_hf": max(r["pimoe_vs_best_hf"] for r in rows),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048, 16384])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args)
    print(f"worst pimoe / best HF: {result['worst_pimoe_vs_best_hf']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
