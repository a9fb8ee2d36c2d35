"""Expert parallelism on 1, 2 and 4 local processes (gloo) vs the single-process PiMoE layer.

Weak scaling: every process feeds ``tokens_per_rank`` tokens and uses one thread; the group's
step time is the time until every rank has finished (a barrier closes each step). Peers measured
in the same run: the single-process layer on one thread, and on all of the machine's cores.
More processes than cores oversubscribe the machine; the result says so (``oversubscribed``).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

from pimoe.bench.printing import print_table
from pimoe.bench.timing import interleaved_medians, run_header
from pimoe.io import atomic_write_text
from pimoe.moe import PiMoE
from pimoe.moe.parallel import ExpertParallelMoE, init_process_group


@dataclass
class EPBenchConfig:
    """Sizes of the expert-parallel benchmark (layer sizes as in the layer benchmark)."""

    d_model: int = 512
    ffn_dim: int = 1024
    num_experts: int = 8
    top_k: int = 2
    tokens_per_rank: int = 2048
    processes: list[int] = field(default_factory=lambda: [1, 2, 4])
    rounds: int = 5
    seed: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer(cfg: EPBenchConfig) -> PiMoE:
    torch.manual_seed(cfg.seed)
    return PiMoE(cfg.d_model, num_experts=cfg.num_experts, top_k=cfg.top_k, ffn_dim=cfg.ffn_dim)


def _inputs(cfg: EPBenchConfig, world: int) -> torch.Tensor:
    """``[world * tokens_per_rank, D]``: rank ``r`` takes rows ``r*T:(r+1)*T``."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randn(world * cfg.tokens_per_rank, cfg.d_model, generator=gen)


def _steps(module: torch.nn.Module, x: torch.Tensor, sync: bool) -> dict[str, Callable[[], None]]:
    """Forward (inference mode) and forward+backward steps; ``sync`` ends each with a barrier."""

    def fwd() -> None:
        with torch.inference_mode():
            module(x)
        if sync:
            dist.barrier()

    def fwdbwd() -> None:
        module.zero_grad(set_to_none=True)
        module(x.detach().requires_grad_()).sum().backward()
        if sync:
            dist.barrier()

    return {"fwd": fwd, "fwd+bwd": fwdbwd}


def _worker(rank: int, world: int, port: int, cfg: EPBenchConfig, out_path: str) -> None:
    torch.set_num_threads(1)
    init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=5),
    )
    layer = _layer(cfg)
    ep = ExpertParallelMoE.from_layer(layer)
    x_all = _inputs(cfg, world)
    x = x_all[rank * cfg.tokens_per_rank : (rank + 1) * cfg.tokens_per_rank]
    with torch.inference_mode():
        out = ep(x)  # [T, D]
    gathered = [torch.empty_like(out) for _ in range(world)] if rank == 0 else None
    dist.gather(out, gathered, dst=0)
    # Bytes this rank sends to other ranks in one forward: token rows out, result rows back,
    # and the per-expert counts; the backward sends the rows again, in reverse.
    row_bytes = cfg.d_model * out.element_size()
    remote_rows = sum(ep.last_send_splits) - ep.last_send_splits[rank]
    count_bytes = (world - 1) * (cfg.num_experts // world) * 8
    sent = torch.tensor(
        [2 * remote_rows * row_bytes + count_bytes, 4 * remote_rows * row_bytes + count_bytes],
        dtype=torch.float64,
    )
    dist.all_reduce(sent)
    contenders = {f"ep {k}": f for k, f in _steps(ep, x, sync=world > 1).items()}
    if world == 1:  # the single-process peer on one thread, interleaved with the same rounds
        contenders.update({f"single {k}": f for k, f in _steps(layer, x, sync=False).items()})
    times = interleaved_medians(contenders, cfg.rounds)
    if rank == 0:
        assert gathered is not None
        with torch.inference_mode():
            diff = (torch.cat(gathered) - layer(x_all)).abs().max().item()
        tokens = world * cfg.tokens_per_rank
        result: dict[str, object] = {
            "processes": world,
            "fwd_tokens_per_s": tokens / times["ep fwd"],
            "fwdbwd_tokens_per_s": tokens / times["ep fwd+bwd"],
            "a2a_bytes_per_token_fwd": sent[0].item() / tokens,
            "a2a_bytes_per_token_fwdbwd": sent[1].item() / tokens,
            "max_abs_diff_vs_single_process": diff,
            "oversubscribed": world > (os.cpu_count() or 1),
        }
        if world == 1:
            single = {
                "1_threads": {
                    "fwd_tokens_per_s": tokens / times["single fwd"],
                    "fwdbwd_tokens_per_s": tokens / times["single fwd+bwd"],
                }
            }
            cores = os.cpu_count() or 1
            if cores > 1:  # the whole machine in one process
                torch.set_num_threads(cores)
                t = interleaved_medians(_steps(layer, x, sync=False), cfg.rounds)
                single[f"{cores}_threads"] = {
                    "fwd_tokens_per_s": tokens / t["fwd"],
                    "fwdbwd_tokens_per_s": tokens / t["fwd+bwd"],
                }
            result["single_process"] = single
        Path(out_path).write_text(json.dumps(result))
    dist.barrier()  # tear gloo down together (a rank leaving early can abort in its destructor)
    dist.destroy_process_group()


def run(cfg: EPBenchConfig, console: Console | None = None) -> dict:
    """Spawn each process count in turn, measure, and return a JSON-serializable dict."""
    console = console or Console()
    for world in cfg.processes:
        if cfg.num_experts % world:
            raise ValueError(f"num_experts={cfg.num_experts} is not divisible by {world} processes")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in cfg.processes:
            path = os.path.join(tmp, f"{world}.json")
            mp.spawn(_worker, args=(world, _free_port(), cfg, path), nprocs=world, join=True)
            rows.append(json.loads(Path(path).read_text()))
    single = next((r.pop("single_process") for r in rows if "single_process" in r), None)
    if single is not None:
        for row in rows:
            for name, peer in single.items():
                row[f"fwdbwd_vs_single_{name}"] = (
                    row["fwdbwd_tokens_per_s"] / peer["fwdbwd_tokens_per_s"]
                )
    result = {
        **run_header("expert_parallel", cfg),
        "backend": "gloo",
        "threads_per_process": 1,
        "max_abs_diff_vs_single_process": max(r["max_abs_diff_vs_single_process"] for r in rows),
        "fwdbwd_tokens_per_s": {str(r["processes"]): r["fwdbwd_tokens_per_s"] for r in rows},
        "single_process": single,
        "rows": rows,
    }
    _print(result, console)
    return result


def _print(result: dict, console: Console) -> None:
    cfg = result["config"]
    peers = list(result["single_process"] or {})
    print_table(
        console,
        f"Expert parallelism: gloo, {result['cpu_count']} cores, 1 thread and "
        f"{cfg['tokens_per_rank']} tokens per process",
        (
            "procs",
            "fwd tok/s",
            "f+b tok/s",
            *[f"f+b / 1 proc {p.split('_')[0]} thr" for p in peers],
            "a2a B/tok f+b",
            "max |diff|",
            "over-sub",
        ),
        [
            (
                str(r["processes"]),
                f"{r['fwd_tokens_per_s']:,.0f}",
                f"{r['fwdbwd_tokens_per_s']:,.0f}",
                *[f"{r[f'fwdbwd_vs_single_{p}']:.2f}" for p in peers],
                f"{r['a2a_bytes_per_token_fwdbwd']:,.0f}",
                f"{r['max_abs_diff_vs_single_process']:.0e}",
                "yes" if r["oversubscribed"] else "no",
            )
            for r in result["rows"]
        ],
    )
    for name, peer in (result["single_process"] or {}).items():
        console.print(
            f"single-process PiMoE, {name.split('_')[0]} thread(s): fwd {peer['fwd_tokens_per_s']:,.0f} "
            f"tok/s, fwd+bwd {peer['fwdbwd_tokens_per_s']:,.0f} tok/s"
        )


def main(quick: bool = False, json_path: Path | None = None, rounds: int | None = None) -> dict:
    """Entry point of ``pimoe bench expert-parallel`` and ``benchmarks/expert_parallel.py``."""
    cfg = EPBenchConfig(tokens_per_rank=512, rounds=3) if quick else EPBenchConfig()
    if rounds is not None:
        cfg.rounds = rounds
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
