"""The real-LLM comparison behind ``pimoe bench computation --model smollm2``.

Trains the chain's modules on the frozen LM (timed), then answers the same held-out word problems
(longer operands *and* unseen templates) with four pipelines, interleaved problem by problem, all
greedy with a KV cache and the same few-shot examples: (a) the LM alone, (b) the PiMoE chain,
(c) a few-shot prompted tool call, (d) a two-call agent (:mod:`pimoe.compute.llm_baselines`),
and (c') the tool call with LoRA adapters tuned on the chain's training questions with the
chain's training budget (:mod:`pimoe.compute.tool_call_lora`, :func:`tool_lora_settings`; trained
once, then loaded from the pimoe cache).
An answer is right when the last number of its text (tool-call markup removed) is the exact result.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import track

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.llm_baselines import PipelineRun, lm_only, tool_call, two_call
from pimoe.compute.llm_chain import ComputationChain
from pimoe.compute.llm_prompts import (
    fewshot_prefix,
    final_number,
    shot_problems,
    translate_prefix,
)
from pimoe.compute.llm_runner import LMRunner
from pimoe.compute.llm_train import QUICK_SETTINGS, ChainTrainSettings, train_chain
from pimoe.compute.tool_call_lora import ToolLoRASettings, cached_tool_lora
from pimoe.compute.word_problems import (
    HELDOUT_SECOND,
    HELDOUT_THIRD,
    PATTERNS,
    TEMPLATES,
    WordProblem,
    WordProblemSet,
)
from pimoe.tables import Table

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PIPELINES = ("lm_only", "pimoe", "tool_call", "two_call")
LORA_PIPELINE = "tool_call_lora"
# Passes of the tool-call adapters over the chain's training examples, chosen so that their
# training CPU time matches the chain's modules' (feature passes + router + head) on the same
# examples: on SmolLM2-135M, quick settings, one thread, the chain took 193.7 s CPU and one LoRA
# step (4 examples) 2.7-2.9 s, so 0.55 of a pass (71 of 128 steps; docs/computation.md, "(c') the
# LoRA-tuned tool call", has the measured ratio).
TOOL_LORA_EPOCHS = 0.55
EVAL_OFFSET = 500_000
MODELS = {"smollm2": "smollm2-135m-instruct"}


@dataclass(frozen=True)
class LLMBenchConfig:
    """Base model, training settings and evaluation size."""

    model: str = "smollm2-135m-instruct"
    train: ChainTrainSettings = field(default_factory=ChainTrainSettings)
    tool_lora: ToolLoRASettings = field(
        default_factory=lambda: ToolLoRASettings(epochs=TOOL_LORA_EPOCHS)
    )
    eval_problems: int = 64
    max_new_tokens: int = 48
    threads: int = 1


QUICK = LLMBenchConfig(train=QUICK_SETTINGS, eval_problems=32)


def pipeline_names(pipelines: Sequence[str] | None) -> tuple[str, ...]:
    """The pipelines to evaluate, in table order: all of them (:data:`PIPELINES` and
    :data:`LORA_PIPELINE`) for ``None``; ``"pimoe"`` always runs (its expression checks are
    part of every result)."""
    every = (*PIPELINES, LORA_PIPELINE)
    if pipelines is None:
        return every
    if isinstance(pipelines, str):
        raise TypeError("pipelines must be a sequence of names, not one string")
    unknown = sorted(set(pipelines) - set(every))
    if unknown:
        raise ValueError(f"unknown pipelines {unknown}; choose from {list(every)}")
    return tuple(p for p in every if p in pipelines or p == "pimoe")


def expression_errors(expression: str | None, problem: WordProblem) -> tuple[bool, bool]:
    """``(operator tree right, operands right given the tree)`` of a chain's expression: the tree is
    the expression with its numbers replaced by slots, the operands its numbers in order."""
    if not expression:
        return False, False
    shape = re.sub(r"[0-9]+", "#", expression)
    tree_ok = shape == re.sub(r"\{[a-d]\}", "#", PATTERNS[problem.pattern])
    return tree_ok, tree_ok and re.findall(r"[0-9]+", expression) == list(problem.operands)


def call_checks(
    text: str, problem: WordProblem, engine: ArithmeticEngine
) -> tuple[bool, bool, bool]:
    """``(a call was written, its numbers are all operands of the question, copied digit for
    digit, its value is the exact answer)`` for the first ``<<...>>`` call in a tool-call
    pipeline's ``text``."""
    calls = re.findall(r"<<(.*?)>>", text)
    if not calls:
        return False, False, False
    copied = set(re.findall(r"[0-9]+", calls[0])) <= set(problem.operands)
    return True, copied, engine.compute(calls[0]) == problem.answer


def tool_lora_settings(cfg: LLMBenchConfig) -> ToolLoRASettings:
    """``cfg.tool_lora`` on the chain's training questions (counts of template and composed
    problems, digits and seed of ``cfg.train``); its ``epochs`` stay (by default
    :data:`TOOL_LORA_EPOCHS`, the chain's training budget in CPU time)."""
    t = cfg.train
    return replace(
        cfg.tool_lora,
        problems=t.problems,
        composed=t.composed,
        train_digits=t.train_digits,
        heldout_digits=t.heldout_digits,
        seed=t.seed,
    )


def run(cfg: LLMBenchConfig, progress: bool = True, pipelines: Sequence[str] | None = None) -> dict:
    """Train the chain (and the tool-call adapters, or load those from the cache, when
    :data:`LORA_PIPELINE` is among ``pipelines``), then evaluate ``pipelines`` (all for ``None``,
    see :func:`pipeline_names`); the result dict (see :func:`print_report` for keys)."""
    names = pipeline_names(pipelines)
    from pimoe.models import load_pretrained

    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, tokenizer = load_pretrained(cfg.model, progress=progress)
        cpu = time.process_time()
        chain, report = train_chain(model, tokenizer, cfg.model, cfg.train, progress=progress)
        report = {**report, "train_cpu_seconds_pimoe": round(time.process_time() - cpu, 1)}
        tuned = None
        if LORA_PIPELINE in names:
            tuned, lora_report, source = cached_tool_lora(
                model, tokenizer, cfg.model, tool_lora_settings(cfg), progress=progress
            )
            report = {**report, **lora_keys(lora_report, source)}
            report["train_cpu_ratio_tool_call_lora"] = round(
                lora_report["train_cpu_s"] / report["train_cpu_seconds_pimoe"], 3
            )
        return evaluate(chain, cfg, report, progress, tuned, names)
    finally:
        torch.set_num_threads(previous)


def lora_keys(report: dict, source: str) -> dict:
    """The result keys of the tool-call adapters' training report (``source``: cache or trained)."""
    return {
        "train_seconds_tool_call_lora": report["train_s"],
        "train_cpu_seconds_tool_call_lora": report["train_cpu_s"],
        "train_steps_tool_call_lora": report["steps"],
        "train_examples_tool_call_lora": report["examples"],
        "train_examples_seen_tool_call_lora": report["examples_seen"],
        "params_tool_call_lora": report["params"],
        "loss_first_tool_call_lora": report["loss_first"],
        "loss_final_tool_call_lora": report["loss_final"],
        "settings_tool_call_lora": report["settings"],
        "source_tool_call_lora": source,
    }


def evaluate(
    chain: ComputationChain,
    cfg: LLMBenchConfig,
    report: dict,
    progress: bool = True,
    tuned: PreTrainedModel | None = None,
    pipelines: Sequence[str] | None = None,
) -> dict:
    """Answer ``cfg.eval_problems`` held-out problems with ``pipelines`` (default: the four of
    :data:`PIPELINES`; see :func:`pipeline_names`), interleaved; with ``tuned`` (the LM with
    merged tool-call adapters) also with the LoRA-tuned tool call, which answers without a
    few-shot prefix."""
    problems = WordProblemSet(cfg.train.train_digits, cfg.train.heldout_digits, cfg.train.seed)
    shots = shot_problems(problems, cfg.train.shots)
    model, tokenizer, engine = chain.model, chain.tokenizer, chain.engine
    tool = LMRunner(model, tokenizer, fewshot_prefix(shots, "tool"), chain.config.layers)
    agent = LMRunner(model, tokenizer, fewshot_prefix(shots, "request"), chain.config.layers)
    translator = LMRunner(model, tokenizer, translate_prefix(shots), chain.config.layers)
    n = cfg.max_new_tokens
    answer: dict[str, Callable[[str], PipelineRun]] = {
        "lm_only": lambda q: lm_only(chain.runner, q, n),
        "tool_call": lambda q: tool_call(tool, engine, q, n),
        "two_call": lambda q: two_call(agent, translator, engine, q, n),
    }
    if tuned is not None:
        tuned_runner = LMRunner(tuned, tokenizer, "", chain.config.layers)
        answer[LORA_PIPELINE] = lambda q: tool_call(tuned_runner, engine, q, n)
    elif pipelines is not None and LORA_PIPELINE in pipelines:
        raise ValueError(f"pipeline {LORA_PIPELINE!r} needs the tuned model (tuned=None)")
    pipelines = tuple(p for p in pipeline_names(pipelines) if p in answer or p == "pimoe")
    runs: dict[str, list[PipelineRun]] = {p: [] for p in pipelines}
    correct: dict[str, list[bool]] = {p: [] for p in pipelines}
    expression_right, tree_right, operands_right, misses = [], [], [], []
    tool_pipelines = [p for p in pipelines if p.startswith("tool_call")]
    checks: dict[str, list[tuple[bool, bool, bool]]] = {p: [] for p in tool_pipelines}
    evaluation = problems.problems("heldout", EVAL_OFFSET, cfg.eval_problems)
    for problem in track(
        evaluation, description="held-out problems", disable=not progress, transient=True
    ):
        q = problem.question
        c = chain.run(q, n)
        outs = {
            name: PipelineRun(
                c.text,
                c.generated_tokens,
                c.forward_passes,
                int(c.expression is not None),
                c.seconds,
            )
            if name == "pimoe"
            else answer[name](q)
            for name in pipelines
        }
        expression_right.append(
            c.expression is not None and engine.compute(c.expression) == problem.answer
        )
        tree_ok, operands_ok = expression_errors(c.expression, problem)
        tree_right.append(tree_ok)
        operands_right.append(operands_ok)
        for name in tool_pipelines:
            checks[name].append(call_checks(outs[name].text, problem, engine))
        for name, out in outs.items():
            runs[name].append(out)
            correct[name].append(final_number(out.text) == problem.answer)
        if not correct["pimoe"][-1]:
            misses.append(
                {
                    "question": q,
                    "template": TEMPLATES["heldout"].index(problem.template),
                    "answer": problem.answer,
                    "expression": problem.expression,
                    "pimoe_expression": c.expression,
                    "pimoe_text": c.text,
                }
            )
    result: dict = {
        "benchmark": "computation",
        "model": cfg.model,
        "eval_problems": len(evaluation),
        "config": {
            **asdict(cfg),
            "train": asdict(cfg.train),
            "tool_lora": asdict(tool_lora_settings(cfg)),  # as trained, on the chain's questions
        },
        "torch_threads": cfg.threads,
        **{k: v for k, v in report.items() if k != "settings"},
        "train_seconds_pimoe": round(
            report["feature_s"] + report["train_s_router"] + report["train_s_head"], 1
        ),
    }
    for name in pipelines:
        result[f"accuracy_{name}"] = round(statistics.mean(correct[name]), 4)
        result[f"tokens_{name}"] = round(statistics.mean(r.generated_tokens for r in runs[name]), 2)
        result[f"forward_passes_{name}"] = round(
            statistics.mean(r.forward_passes for r in runs[name]), 2
        )
        result[f"latency_ms_{name}"] = round(
            1e3 * statistics.median(r.seconds for r in runs[name]), 1
        )
        result[f"calls_{name}"] = round(statistics.mean(r.calls for r in runs[name]), 2)
    result["expression_accuracy_pimoe"] = round(statistics.mean(expression_right), 4)
    result["tree_accuracy_pimoe"] = round(statistics.mean(tree_right), 4)
    result["operand_accuracy_pimoe"] = (
        round(statistics.mean(o for o, t in zip(operands_right, tree_right) if t), 4)
        if any(tree_right)
        else 0.0
    )
    template = [TEMPLATES["heldout"].index(p.template) for p in evaluation]
    for name in pipelines:
        by = {
            i: [c for c, t in zip(correct[name], template) if t == i] for i in sorted(set(template))
        }
        result[f"accuracy_by_template_{name}"] = {
            str(i): round(statistics.mean(v), 3) for i, v in by.items()
        }
        for key, chosen in (
            ("first", lambda t: t not in HELDOUT_SECOND and t not in HELDOUT_THIRD),
            ("second", lambda t: t in HELDOUT_SECOND),
            ("third", lambda t: t in HELDOUT_THIRD),
        ):
            picked = [c for c, t in zip(correct[name], template) if chosen(t)]
            result[f"eval_problems_{key}_phrasings"] = len(picked)
            result[f"accuracy_{name}_{key}_phrasings"] = (
                round(statistics.mean(picked), 4) if picked else None
            )
    for name in tool_pipelines:
        written, copied, right = zip(*checks[name])
        result[f"call_written_{name}"] = round(statistics.mean(written), 4)
        result[f"call_operands_copied_{name}"] = (
            round(statistics.mean(c for c, w in zip(copied, written) if w), 4)
            if any(written)
            else None
        )
        result[f"call_right_{name}"] = round(statistics.mean(right), 4)
    result["pimoe_misses"] = misses
    result["examples"] = {name: runs[name][0].text for name in pipelines}
    result["examples"]["question"] = evaluation[0].question
    result["examples"]["answer"] = evaluation[0].answer
    return result


def print_report(result: dict, console: Console | None = None) -> None:
    """The pipelines side by side."""
    console = console or Console()
    table = Table(
        title=f"{result['model']}: {result['eval_problems']} held-out word problems "
        "(longer operands, unseen templates)"
    )
    for column in (
        "pipeline",
        "accuracy",
        "generated tokens",
        "forward passes",
        "median latency ms",
        "engine calls",
    ):
        table.add_column(column, justify="right", no_wrap=column == "pipeline")
    for name in (n for n in (*PIPELINES, LORA_PIPELINE) if f"accuracy_{n}" in result):
        table.add_row(
            name,
            f"{result[f'accuracy_{name}']:.3f}",
            f"{result[f'tokens_{name}']:.1f}",
            f"{result[f'forward_passes_{name}']:.1f}",
            f"{result[f'latency_ms_{name}']:.0f}",
            f"{result[f'calls_{name}']:.2f}",
        )
    console.print(table)
    console.print(
        f"text-to-computation expression right: {result['expression_accuracy_pimoe']:.3f} (operator tree "
        f"{result['tree_accuracy_pimoe']:.3f}, operands given the tree {result['operand_accuracy_pimoe']:.3f}); "
        f"module training: features {result['feature_s']} s, router {result['train_s_router']} s, "
        f"head {result['train_s_head']} s"
    )
    console.print(
        "accuracy by held-out set (first / second / third phrasings): "
        + ", ".join(
            f"{name} "
            + " / ".join(
                f"{result[f'accuracy_{name}_{key}_phrasings']} "
                f"({result[f'eval_problems_{key}_phrasings']})"
                for key in ("first", "second", "third")
            )
            for name in ("pimoe", "tool_call", LORA_PIPELINE)
            if f"accuracy_{name}_first_phrasings" in result
        )
    )
    for name in ("tool_call", LORA_PIPELINE):
        if f"call_written_{name}" in result:
            console.print(
                f"{name}: a call written in {result[f'call_written_{name}']:.3f} of the problems, "
                f"its numbers copied from the question in {result[f'call_operands_copied_{name}']} "
                f"of those, its value right in {result[f'call_right_{name}']:.3f}"
            )
    if "train_seconds_tool_call_lora" in result:
        console.print(
            f"tool-call LoRA ({result['source_tool_call_lora']}): "
            f"{result['train_steps_tool_call_lora']} steps on "
            f"{result['train_examples_tool_call_lora']} examples in "
            f"{result['train_seconds_tool_call_lora']} s wall / "
            f"{result['train_cpu_seconds_tool_call_lora']} s CPU "
            f"({result.get('train_cpu_ratio_tool_call_lora')}x the chain modules' CPU seconds), "
            f"{result['params_tool_call_lora']} parameters, loss "
            f"{result['loss_first_tool_call_lora']} -> {result['loss_final_tool_call_lora']}"
        )


def main(
    model: str,
    quick: bool = False,
    threads: int = 1,
    progress: bool = True,
    pipelines: Sequence[str] | None = None,
) -> dict:
    """Run the comparison for ``model`` (a key of :data:`MODELS`) and print it; ``pipelines``
    limits it to some pipelines (:func:`pipeline_names`)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    cfg = QUICK if quick else LLMBenchConfig()
    cfg = replace(cfg, model=MODELS[model], threads=threads)
    start = time.perf_counter()
    result = run(cfg, progress, pipelines)
    result["total_s"] = round(time.perf_counter() - start, 1)
    print_report(result)
    return result
