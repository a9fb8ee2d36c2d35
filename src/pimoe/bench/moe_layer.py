"""PiMoE layer vs Hugging Face's MoE block (eager and grouped_mm experts) vs the dense limit.

Two shapes at d_model 512, SwiGLU experts, fp32: 8 experts top-2 of width 1024 (Mixtral-like)
and 64 experts top-8 of width 256 (fine-grained, as OLMoE / Qwen3-MoE). All MoE contenders share
the same weights (``PiMoE.from_hf(block)``); the run checks that their outputs agree. The dense
limit is one SwiGLU FFN of width ``top_k * ffn_dim`` on every token: the same active FLOPs as
the MoE layer with no routing, sorting or gathering. Every contender runs once per round, in
turn, so that the machine's load drift hits all of them alike; ratios are medians over rounds.
HF's eager experts (a Python loop over experts with a boolean mask per expert) are timed in
forward+backward up to ``eager_max_tokens`` tokens only: beyond that their backward takes tens of
times the dense limit and a round takes minutes; those rows compare PiMoE with grouped_mm alone
and say so (``hf_eager_vs_dense`` is null). Forward rows time every contender at every size.

The dense limit's weights fit in the CPU caches; the experts' do not (50-100 MB in fp32), so a
MoE layer also streams every expert weight from DRAM on each call. ``weight_stream_ms`` times
that alone (the weights read once, or for forward+backward read twice and a gradient written),
interleaved with the contenders; ``floor_vs_dense = 1 + weight_stream / dense`` is what a MoE
layer costs relative to the dense limit if it overlaps none of that traffic with its matmuls.

Forward rows also time inference on weights prepacked by oneDNN (``pimoe.moe.pack_experts_``):
``pimoe_packed`` (the same PiMoE layer, packed) and, since packing speeds up any matmul, the
dense limit on packed weights too (``dense_packed``); ``pimoe_packed_vs_dense_packed`` compares
the two on the same matmul library. Both are null where packing cannot run.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from pimoe.bench.timing import geomean, interleaved_medians, load_average, run_header
from pimoe.io import atomic_write_text
from pimoe.models.progress import Progress
from pimoe.moe import PiMoE, StackedExperts, SwiGLU, pack_experts_
from pimoe.moe.prepack import why_not_packable
from pimoe.moe.threaded import expert_matmul, threaded_kernel
from pimoe.tables import Table

# name -> (experts, top_k, expert width)
SHAPES: dict[str, tuple[int, int, int]] = {
    "E8 k2 f1024": (8, 2, 1024),
    "E64 k8 f256": (64, 8, 256),
}
HF_CONTENDERS = ("hf_eager", "hf_grouped_mm")


@dataclass
class MoEBenchConfig:
    """Sizes of the layer benchmark."""

    d_model: int = 512
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    tokens: list[int] = field(default_factory=lambda: [128, 512, 2048, 16384])
    rounds: int = 7
    threads: int = 2
    seed: int = 0
    eager_max_tokens: int = 2048


def _hf_block(d_model: int, shape: tuple[int, int, int], implementation: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    experts, top_k, width = shape
    hf_cfg = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=width,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
    )
    hf_cfg._experts_implementation = implementation
    return MixtralSparseMoeBlock(hf_cfg)


def _step(
    module: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    backward: bool,
    params: list[nn.Parameter],
) -> Callable[[], object]:
    def run() -> None:
        for p in params:
            p.grad = None
        if backward:
            out = module(x.detach().requires_grad_())
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        else:
            with torch.inference_mode():
                module(x)

    return run


def _weight_stream(weights: list[torch.Tensor], backward: bool) -> Callable[[], object]:
    """What a MoE layer must move between DRAM and the CPU on top of the dense limit's work:
    every expert weight read once (forward), or read twice and a weight-sized gradient written
    once (forward+backward). Timed with the contenders, so it reads the weights cold."""
    sinks = [torch.empty_like(w) for w in weights] if backward else []

    def run() -> None:
        with torch.inference_mode():
            for w in weights:
                w.sum()
            for w, sink in zip(weights, sinks):
                sink.copy_(w)

    return run


class _PackedSwiGLU(nn.Module):
    """A dense SwiGLU's forward on its weights prepacked by oneDNN (the dense limit with the
    matmul library of packed experts): ``[..., D] -> [T, D]``."""

    def __init__(self, dense: SwiGLU, rows_hint: int) -> None:
        super().__init__()
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.gate_up = reorder(dense.gate_up.weight.detach(), rows_hint)
        self.down = reorder(dense.down.weight.detach(), rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.mkldnn._linear_pointwise
        h = linear(x.reshape(-1, x.shape[-1]), self.gate_up, None, "none", [], "")
        gate, up = h.chunk(2, dim=-1)
        out: torch.Tensor = linear(
            (torch.nn.functional.silu(gate) * up).contiguous(), self.down, None, "none", [], ""
        )
        return out


def _packed_contenders(contenders: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``pimoe_packed`` and ``dense_packed`` (forward only), or nothing where packing cannot
    run."""
    experts, dense = contenders["pimoe"].get_submodule("experts"), contenders["dense"]
    assert isinstance(experts, StackedExperts) and isinstance(dense, SwiGLU)
    if why_not_packable(experts.w_in, experts.w_out) is not None:
        return {}
    packed = copy.deepcopy(contenders["pimoe"])
    pack_experts_(packed)
    return {"pimoe_packed": packed, "dense_packed": _PackedSwiGLU(dense, 512)}


def _contenders(cfg: MoEBenchConfig, shape: tuple[int, int, int]) -> dict[str, nn.Module]:
    hf_eager = _hf_block(cfg.d_model, shape, "eager")
    for p in hf_eager.parameters():
        nn.init.normal_(p, std=0.02)
    hf_grouped = _hf_block(cfg.d_model, shape, "grouped_mm")
    hf_grouped.load_state_dict(hf_eager.state_dict())
    _, top_k, width = shape
    return {
        "dense": SwiGLU(cfg.d_model, top_k * width),
        "pimoe": PiMoE.from_hf(hf_eager),
        "hf_eager": hf_eager,
        "hf_grouped_mm": hf_grouped,
    }


def script_shapes(
    description: str, tokens: list[int], rounds: int
) -> tuple[argparse.Namespace, Iterator[tuple[str, tuple[int, int, int], dict[str, nn.Module]]]]:
    """Set up a comparison script of ``benchmarks/``: parse ``--tokens``, ``--rounds``,
    ``--threads`` (defaults ``tokens``, ``rounds``, 2), seed, set torch's threads, print the
    load, and return the arguments with an iterator of ``(shape name, shape, contenders)`` over
    :data:`SHAPES` (the contenders of :func:`_contenders`, built when reached)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tokens", type=int, nargs="+", default=tokens)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = MoEBenchConfig(threads=args.threads)
    print(f"{args.threads} threads, 1-min load {load_average():.1f}")
    return args, ((name, shape, _contenders(cfg, shape)) for name, shape in SHAPES.items())


def compare_setting(
    description: str, switch: Callable[[bool], None], labels: tuple[str, str] = ("off", "on")
) -> None:
    """A ``benchmarks/`` script comparing one setting of the PiMoE layer off and on: for each
    shape of :data:`SHAPES` and ``--tokens`` (default 128 512), forward and forward+backward,
    ``switch(False)`` / ``switch(True)`` before each step of the same layer, interleaved with
    the dense limit over ``--rounds`` (default 15); prints time / dense for both and on / off,
    then leaves the setting on."""
    args, shapes = script_shapes(description, [128, 512], 15)
    off, on = labels

    def switched(run: Callable[[], object], state: bool) -> Callable[[], None]:
        def step() -> None:
            switch(state)
            run()

        return step

    for name, _, contenders in shapes:
        dense, layer = contenders["dense"], contenders["pimoe"]
        for tokens in args.tokens:
            x = torch.randn(1, tokens, MoEBenchConfig().d_model)
            for backward in (False, True):
                run = _step(layer, x, backward, list(layer.parameters()))
                times = interleaved_medians(
                    {
                        "dense": _step(dense, x, backward, list(dense.parameters())),
                        off: switched(run, False),
                        on: switched(run, True),
                    },
                    args.rounds,
                )
                a, b = times[off] / times["dense"], times[on] / times["dense"]
                mode = "fwd+bwd" if backward else "fwd"
                print(
                    f"{name} {tokens:5d} {mode:8s} {off} {a:.3f} {on} {b:.3f} {on}/{off} {b / a:.3f}"
                )
    switch(True)
    print(f"1-min load {load_average():.1f}")


def _measure_shape(
    cfg: MoEBenchConfig, name: str, progress: Progress
) -> tuple[list[dict[str, Any]], tuple[float, float]]:
    """The shape's rows and the largest ``|pimoe - HF|`` and ``|pimoe_packed - pimoe|``."""
    contenders = _contenders(cfg, SHAPES[name])
    packed = _packed_contenders(contenders)
    rows, max_diff, packed_diff = [], 0.0, 0.0
    experts = contenders["pimoe"].get_submodule("experts")
    expert_weights = [p.detach() for p in experts.parameters()]
    for tokens in cfg.tokens:
        x = torch.randn(1, tokens, cfg.d_model)
        with torch.inference_mode():
            ours = contenders["pimoe"](x)
            for hf in HF_CONTENDERS:
                max_diff = max(max_diff, (ours - contenders[hf](x)).abs().max().item())
            if packed:
                diff = (ours - packed["pimoe_packed"](x)).abs().max().item()
                packed_diff = max(packed_diff, diff)
        for backward in (False, True):
            fns = {
                key: _step(m, x, backward, list(m.parameters()))
                for key, m in (contenders if backward else contenders | packed).items()
                if key != "hf_eager" or not backward or tokens <= cfg.eager_max_tokens
            }
            fns["weight_stream"] = _weight_stream(expert_weights, backward)
            times = interleaved_medians(fns, cfg.rounds)
            row: dict[str, Any] = {
                "shape": name,
                "tokens": tokens,
                "mode": "fwd+bwd" if backward else "fwd",
                "dense_ms": times["dense"] * 1e3,
                "expert_weight_mb": sum(w.numel() * w.element_size() for w in expert_weights) / 1e6,
                "weight_stream_ms": times["weight_stream"] * 1e3,
                "floor_vs_dense": 1 + times["weight_stream"] / times["dense"],
                "load": load_average(),
            }
            row.update(
                {
                    f"{key}_vs_dense": times[key] / times["dense"] if key in times else None
                    for key in (*contenders, "pimoe_packed", "dense_packed")
                    if key != "dense"
                }
            )
            row["pimoe_packed_vs_dense_packed"] = (
                times["pimoe_packed"] / times["dense_packed"] if "dense_packed" in times else None
            )
            row["pimoe_vs_best_hf"] = times["pimoe"] / min(
                times[hf] for hf in HF_CONTENDERS if hf in times
            )
            rows.append(row)
            progress.update(pimoe_vs_dense=row["pimoe_vs_dense"])
    return rows, (max_diff, packed_diff)


def run(cfg: MoEBenchConfig, console: Console | None = None) -> dict[str, Any]:
    """Measure and return the results as a JSON-serializable dict.

    Headline keys: ``pimoe_vs_dense_512`` (per shape and mode, the 1.25x target),
    ``pimoe_packed_vs_dense_512`` (per shape, forward on packed weights; null where packing
    cannot run),
    ``worst_pimoe_vs_best_hf`` (the largest pimoe / best-HF ratio over every row; <= 1 means
    never slower than the better HF backend), ``load_start`` / ``load_end`` (1-minute load);
    each row also has ``weight_stream_ms`` and ``floor_vs_dense`` (see the module docstring);
    ``threaded_experts_kernel``: whether :mod:`pimoe.moe.threaded` was available to PiMoE.
    """
    console = console or Console()
    unknown = sorted(set(cfg.shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    load_start = load_average()
    rows: list[dict[str, Any]] = []
    max_diff = packed_diff = 0.0
    with Progress(
        len(cfg.shapes) * len(cfg.tokens) * 2, "bench moe (shape x tokens x mode)"
    ) as bar:
        for name in cfg.shapes:
            shape_rows, (diff, diff_packed) = _measure_shape(cfg, name, bar)
            rows += shape_rows
            max_diff, packed_diff = max(max_diff, diff), max(packed_diff, diff_packed)
    result: dict[str, Any] = {
        **run_header("moe_layer", cfg),
        "pimoe_vs_dense_512": {
            f"{r['shape']} {r['mode']}": r["pimoe_vs_dense"] for r in rows if r["tokens"] == 512
        },
        "pimoe_packed_vs_dense_512": {
            r["shape"]: r["pimoe_packed_vs_dense"]
            for r in rows
            if r["tokens"] == 512 and r["mode"] == "fwd"
        },
        "worst_pimoe_vs_best_hf": max(r["pimoe_vs_best_hf"] for r in rows),
        "geomean_pimoe_vs_best_hf": geomean([r["pimoe_vs_best_hf"] for r in rows]),
        "max_abs_diff_vs_hf": max_diff,
        "max_abs_diff_packed": packed_diff,
        "threaded_experts_kernel": threaded_kernel() is not None,
        "expert_matmul": expert_matmul(),
        "load_start": load_start,
        "load_end": load_average(),
        "rows": rows,
    }
    _print(result, console)
    return result


def _cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _print(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title="MoE layer: time / dense limit (median of interleaved rounds; < 1 is faster)"
    )
    for col in (
        "shape",
        "tokens",
        "mode",
        "dense ms",
        "floor",
        "pimoe",
        "packed",
        "packed / dense packed",
        "HF eager",
        "HF grouped_mm",
        "pimoe / best HF",
        "load",
    ):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            r["shape"],
            str(r["tokens"]),
            r["mode"],
            f"{r['dense_ms']:.1f}",
            f"{r['floor_vs_dense']:.2f}",
            f"{r['pimoe_vs_dense']:.2f}",
            _cell(r["pimoe_packed_vs_dense"]),
            _cell(r["pimoe_packed_vs_dense_packed"]),
            "-" if r["hf_eager_vs_dense"] is None else f"{r['hf_eager_vs_dense']:.2f}",
            f"{r['hf_grouped_mm_vs_dense']:.2f}",
            f"{r['pimoe_vs_best_hf']:.2f}",
            f"{r['load']:.1f}",
        )
    console.print(table)
    console.print(
        f"pimoe / best HF: worst {result['worst_pimoe_vs_best_hf']:.2f}, geomean "
        f"{result['geomean_pimoe_vs_best_hf']:.2f}; max |pimoe - HF| = {result['max_abs_diff_vs_hf']:.2e}, "
        f"|packed - pimoe| = {result['max_abs_diff_packed']:.2e}; "
        f"1-min load {result['load_start']:.1f} -> {result['load_end']:.1f} on {result['cpu_count']} cores"
    )


def main(
    quick: bool = False,
    json_path: Path | None = None,
    rounds: int | None = None,
    threads: int = 2,
    shapes: list[str] | None = None,
    tokens: list[int] | None = None,
) -> dict[str, Any]:
    """Entry point of ``pimoe bench moe`` and ``benchmarks/moe_layer.py``; ``shapes`` / ``tokens``
    restrict the run (e.g. one shape at 16384 tokens)."""
    cfg = MoEBenchConfig(threads=threads)
    if quick:
        cfg = MoEBenchConfig(tokens=[128, 512], rounds=5, threads=threads)
    if rounds is not None:
        cfg.rounds = rounds
    if shapes is not None:
        cfg.shapes = shapes
    if tokens is not None:
        cfg.tokens = tokens
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
