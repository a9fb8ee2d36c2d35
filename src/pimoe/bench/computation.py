"""Computation experts, a small-scale reproduction of PiMoE (arXiv:2509.18169): on held-out
arithmetic problems with longer operands than in training, compare (a) the text expert alone,
(b) PiMoE with the trained token-level hand-off to the exact computation expert, and (c) a
tool-call pipeline (the text expert writes the call, generation stops, Python evaluates, the text
expert continues). All use the same trained text expert, greedy KV-free decoding and the same
stopping rule; the modes are interleaved problem by problem so machine noise hits all alike.

Usage: ``pimoe bench computation [--quick] [--json FILE]``; with ``--model smollm2`` the same
comparison runs on a frozen pretrained LM instead (:mod:`pimoe.compute.llm_bench`).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track

from pimoe.bench.timing import run_header
from pimoe.compute.chain import MODES, InferenceChain, span_answer
from pimoe.compute.handoff import router_accuracy, train_router
from pimoe.compute.task import ArithmeticTask, Calls, Problem
from pimoe.compute.train import TrainSettings, train_text_expert
from pimoe.io import atomic_write_text, save_png
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig
from pimoe.tables import Table

EVAL_OFFSET = 500_000  # evaluation problems start here: never seen by the router or the text expert


@dataclass
class ComputationBenchConfig:
    """Task, model and budgets of one comparison run."""

    train_digits: int = 4
    heldout_digits: int = 8
    word_fraction: float = 0.5
    calls: Calls = "reference"
    lm: LMConfig = field(
        default_factory=lambda: LMConfig(
            block_size=128,
            n_layer=2,
            n_head=4,
            d_model=64,
            moe=MoEConfig(num_experts=4, top_k=1, ffn_dim=128),
        )
    )
    lm_train: TrainSettings = field(
        default_factory=lambda: TrainSettings(steps=3000, batch_size=16, lr=1e-2)
    )
    router_train: TrainSettings = field(
        default_factory=lambda: TrainSettings(steps=200, batch_size=16, lr=3e-3)
    )
    router_hidden: int = 64
    eval_problems: int = 100
    router_eval_problems: int = 200
    max_new_tokens: int = 64
    seed: int = 0
    threads: int = 1


QUICK = ComputationBenchConfig(
    lm_train=TrainSettings(steps=800, batch_size=16, lr=1e-2),
    router_train=TrainSettings(steps=100, batch_size=16, lr=3e-3),
    eval_problems=40,
    router_eval_problems=100,
)


def _longest_operand(problem: Problem) -> int:
    return max(len(n) for n in re.findall(r"\d+", problem.expression))


def _evaluate(
    chain: InferenceChain, problems: list[Problem], progress: bool
) -> dict[str, dict[str, list]]:
    """Per mode: correctness, expression correctness, ms, steps and inserted bytes per problem."""
    rows: dict[str, dict[str, list]] = {
        m: {"correct": [], "expression": [], "ms": [], "steps": [], "inserted": [], "digits": []}
        for m in MODES
    }
    for problem in track(
        problems, description="decode held-out", disable=not progress, transient=True
    ):
        reference = problem.completion.encode()
        for mode in MODES:  # interleaved: every mode decodes this problem before the next one
            out = chain.run(problem.prompt.encode(), mode)
            row = rows[mode]
            row["correct"].append(span_answer(out.completion) == problem.answer.encode())
            row["expression"].append(out.completion.split(b"=")[0] == reference.split(b"=")[0])
            row["ms"].append(out.seconds * 1e3)
            row["steps"].append(out.steps)
            row["inserted"].append(out.inserted)
            row["digits"].append(_longest_operand(problem))
    return rows


def _by_digits(row: dict[str, list]) -> dict[str, float]:
    digits = sorted(set(row["digits"]))
    return {
        str(d): round(
            statistics.mean(c for c, n in zip(row["correct"], row["digits"]) if n == d), 3
        )
        for d in digits
    }


def run(cfg: ComputationBenchConfig, progress: bool = True) -> dict:
    """Train the text expert and the router, decode the held-out problems in every mode
    (with ``cfg.threads`` torch threads; the previous setting is restored)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: ComputationBenchConfig, progress: bool) -> dict:
    task = ArithmeticTask(
        cfg.train_digits, cfg.heldout_digits, cfg.word_fraction, cfg.seed, cfg.calls
    )
    start = time.perf_counter()
    lm, lm_losses = train_text_expert(task, cfg.lm, cfg.lm_train, progress)
    lm_seconds = time.perf_counter() - start
    router, router_losses = train_router(lm, task, cfg.router_train, cfg.router_hidden, progress)
    router_seconds = time.perf_counter() - start - lm_seconds
    eval_range = range(EVAL_OFFSET, EVAL_OFFSET + cfg.router_eval_problems)
    routing = {
        split: router_accuracy(lm, router, task, split, eval_range)
        for split in ("heldout", "train")
    }
    problems = [task.problem("heldout", EVAL_OFFSET + i) for i in range(cfg.eval_problems)]
    rows = _evaluate(
        InferenceChain(lm, router, task.engine, cfg.max_new_tokens), problems, progress
    )

    result: dict[str, Any] = run_header("computation", cfg)
    result.update(
        {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # float results depend on it (docs)
            "params_text_expert": lm.num_params(),
            "params_router": sum(p.numel() for p in router.parameters()),
            "train_s_text_expert": round(lm_seconds, 1),
            "train_s_router": round(router_seconds, 1),
            "final_loss_text_expert": round(statistics.mean(lm_losses[-20:]), 4),
            "final_loss_router": round(statistics.mean(router_losses[-20:]), 4),
            "router_accuracy_heldout": round(routing["heldout"]["accuracy"], 4),
            "router_heldout": {k: round(v, 4) for k, v in routing["heldout"].items()},
            "router_train_split": {k: round(v, 4) for k, v in routing["train"].items()},
            "eval_problems": len(problems),
        }
    )
    for mode, row in rows.items():
        result[f"accuracy_{mode}"] = round(statistics.mean(row["correct"]), 4)
        result[f"expression_accuracy_{mode}"] = round(statistics.mean(row["expression"]), 4)
        result[f"latency_ms_{mode}"] = round(statistics.mean(row["ms"]), 2)
        result[f"tokens_{mode}"] = round(statistics.mean(row["steps"]), 2)
        result[f"inserted_{mode}"] = round(statistics.mean(row["inserted"]), 2)
        result[f"accuracy_by_longest_operand_{mode}"] = _by_digits(row)
    result["latency_ratio_pimoe_vs_tool_call"] = round(
        result["latency_ms_pimoe"] / result["latency_ms_tool_call"], 3
    )
    result["tokens_ratio_pimoe_vs_tool_call"] = round(
        result["tokens_pimoe"] / result["tokens_tool_call"], 3
    )
    return result


def print_report(result: dict, console: Console | None = None) -> None:
    """The comparison table and the router's scores."""
    console = console or Console()
    table = Table(
        title=f"Held-out problems ({result['eval_problems']}), longest operand "
        f"{result['config']['train_digits'] + 1}..{result['config']['heldout_digits']} digits "
        f"(training: <= {result['config']['train_digits']})"
    )
    for column in (
        "pipeline",
        "answer accuracy",
        "expression written right",
        "latency ms/problem",
        "decoding steps",
        "bytes inserted",
    ):
        table.add_column(column, justify="right")
    for mode in MODES:
        table.add_row(
            mode,
            f"{result[f'accuracy_{mode}']:.3f}",
            f"{result[f'expression_accuracy_{mode}']:.3f}",
            f"{result[f'latency_ms_{mode}']:.1f}",
            f"{result[f'tokens_{mode}']:.1f}",
            f"{result[f'inserted_{mode}']:.1f}",
        )
    console.print(table)
    router = result["router_heldout"]
    console.print(
        f"router (held-out, teacher-forced): token accuracy {router['accuracy']:.4f}, "
        f"hand-off precision {router['precision']:.3f}, recall {router['recall']:.3f}, "
        f"all tokens right in {router['problems_all_correct']:.3f} of problems"
    )
    console.print(
        f"pimoe vs tool_call: latency x{result['latency_ratio_pimoe_vs_tool_call']:.2f}, "
        f"decoding steps x{result['tokens_ratio_pimoe_vs_tool_call']:.2f}"
    )


def plot(result: dict, path: Path) -> None:
    """PNG: answer accuracy per longest-operand length, one line per pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, (marker, style) in zip(MODES, (("o", "-"), ("s", "-"), ("^", "--"), ("x", ":"))):
        by = result[f"accuracy_by_longest_operand_{mode}"]
        ax.plot([int(d) for d in by], list(by.values()), marker=marker, linestyle=style, label=mode)
        ax.set_xticks([int(d) for d in by])
    ax.set(
        xlabel=f"digits of the longest operand (training: <= {result['config']['train_digits']})",
        ylabel="answer accuracy",
        title="Held-out arithmetic",
        ylim=(-0.05, 1.05),
    )
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def main(
    quick: bool = False,
    json_path: Path | None = None,
    threads: int = 1,
    calls: Calls = "reference",
    config: ComputationBenchConfig | None = None,
    progress: bool = True,
    model: str | None = None,
) -> dict:
    """Entry point of ``benchmarks/computation.py`` and ``pimoe bench computation``; ``config``
    replaces the ``quick`` / full presets (and ``calls``). With ``json_path``, the plot goes next
    to it as PNG. With ``model`` (``"smollm2"``), the frozen-pretrained-LM comparison runs instead
    (JSON only)."""
    if model is not None:
        from pimoe.compute.llm_bench import main as llm_main

        result = llm_main(model, quick=quick, threads=threads, progress=progress)
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(result, indent=2))
        return result
    cfg = replace(
        config or replace(QUICK if quick else ComputationBenchConfig(), calls=calls),
        threads=threads,
    )
    result = run(cfg, progress)
    print_report(result)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
        plot(result, Path(json_path).with_suffix(".png"))
    return result
