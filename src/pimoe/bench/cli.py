"""``pimoe bench NAME``: one table row per benchmark; each row becomes a typer command that checks
the extras it needs, then calls ``pimoe.bench.<module>.main(quick=, json_path=, **options)``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from pimoe.extras import check_extra

bench_app = typer.Typer(
    no_args_is_help=True,
    help="Benchmarks; each prints ratios against a peer measured in the same run.",
)


@dataclass(frozen=True)
class Bench:
    """One ``pimoe bench NAME`` command: ``pimoe.bench.<module>.main(quick=, json_path=, **options)``."""

    name: str
    module: str
    summary: str  # the command's help
    quick: str  # help of --quick
    extras: tuple[str, ...] = ()  # pyproject extras it needs (checked before any work)
    options: tuple[inspect.Parameter, ...] = ()  # further options, passed to main() by name
    json_help: str = "Write the results here as JSON."


def _option(
    name: str, kind: Any, default: Any, help: str, *decls: str, **settings: Any
) -> inspect.Parameter:
    """A keyword parameter ``name`` typed ``kind`` that typer turns into an option."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[kind, typer.Option(*decls, help=help, **settings)],
    )


def _rounds() -> inspect.Parameter:
    return _option("rounds", int | None, None, "Timing rounds (median is reported).", min=1)


def _threads(default: int, help: str = "torch threads.") -> inspect.Parameter:
    return _option("threads", int, default, help, min=1)


PNG_NEXT = "Write the results here as JSON (and a PNG plot next to it)."
BENCHMARKS: tuple[Bench, ...] = (
    Bench(
        "moe",
        "moe_layer",
        "PiMoE layer vs HF MixtralSparseMoeBlock (eager, grouped_mm) vs the dense limit: 8 experts top-2 and 64 experts top-8, 128-16384 tokens.",
        "Small sizes (128 and 512 tokens, 5 rounds).",
        ("hf",),
        (_rounds(), _threads(2)),
    ),
    Bench(
        "kv-cache",
        "kv_cache",
        "PiMoELM greedy decoding of 256 tokens with the KV cache vs the uncached loop (same outputs).",
        "Batch 1 only, one round.",
    ),
    Bench(
        "models",
        "models",
        "SmolLM2-135M dense vs split into 8 experts (k=4, k=2): load time, perplexity, tokens/s; HF-families equivalence.",
        "2,048 held-out tokens, 128 prefill and 16 decode tokens, 1 timing round.",
        ("models",),
        (_rounds(),),
    ),
    Bench(
        "balance",
        "balance",
        "Aux-loss-free (bias) balancing vs the Switch aux loss: demo LM and SmolLM2 router training (imbalance, held-out loss).",
        "Smoke-sized runs of both workloads.",
        ("models",),
        (
            _option(
                "steps", int | None, None, "Training steps of both workloads (default 40).", min=1
            ),
        ),
    ),
    Bench(
        "expert-lora",
        "expert_lora",
        "LoRA on experts + attention vs full fine-tuning of the upcycled SmolLM2 (held-out loss, trainable parameters, step time, memory).",
        "Fewer steps and held-out windows.",
        ("models",),
        (_option("steps", int | None, None, "Fine-tuning steps (default 10).", min=1),),
    ),
    Bench(
        "expert-lora-hf",
        "expert_lora_hf",
        "LoRA on transformers experts (random Mixtral, Qwen3-MoE): low-rank path vs the W + s*B@A parametrization vs full fine-tuning (step time, memory).",
        "Smaller models and fewer steps.",
        ("hf",),
    ),
    Bench(
        "quantized-experts",
        "quantized_experts",
        "int8/int4 weight-only fused experts (tiny Mixtral / Qwen3-MoE, upcycled SmolLM2): size vs bf16, logit cosine, perplexity, tokens/s.",
        "Tiny models and fewer held-out tokens.",
        ("models",),
    ),
    Bench(
        "hf-backend",
        "hf_backend",
        "transformers MoE blocks with experts_implementation='pimoe' vs 'grouped_mm' (fwd, fwd+bwd), after the tiny-family check.",
        "Fewer shapes and rounds.",
        ("hf",),
        (_rounds(), _threads(1)),
    ),
    Bench(
        "generate",
        "generate",
        "SmolLM2 served with continuous batching at 1/8/32 streams vs HF generate (sequential and static batches); loopback soak.",
        "32 new tokens, fewer requests, a 2,000-request soak.",
        ("serve", "models"),
        (
            _option(
                "soak_requests",
                int | None,
                None,
                "Requests of the loopback soak (default 10,000; 2,000 with --quick).",
                min=1,
            ),
            _option(
                "long_prompt",
                bool,
                False,
                "Instead: a long prompt arriving among running streams, chunked prefill off vs on (the streams' inter-token latency).",
            ),
        ),
    ),
    Bench(
        "expert-parallel",
        "expert_parallel",
        "Expert parallelism on 1, 2, 4 local gloo processes vs the single-process layer (tokens/s, bytes/token).",
        "512 tokens per process, 3 rounds (~25 s).",
        (),
        (_rounds(),),
    ),
    Bench(
        "computation",
        "computation",
        "PiMoE computation experts on held-out arithmetic: LM alone vs token-level hand-off vs tool call.",
        "800 training steps, 40 held-out problems (~1-2 min).",
        (),
        (
            _threads(1),
            _option(
                "calls",
                str,
                "reference",
                "Call format the text expert learns: 'reference' (#1*#2, resolved by text-to-computation) or 'expression' (literal digits).",
                click_type=click.Choice(["reference", "expression"]),
            ),
            _option(
                "model",
                str | None,
                None,
                "'smollm2': run on the frozen SmolLM2-135M-Instruct (word problems; adds a two-call agent).",
                click_type=click.Choice(["smollm2"]),
            ),
        ),
        PNG_NEXT,
    ),
    Bench(
        "compress",
        "compress",
        "all-MiniLM-L6-v2: pimoe.compress configurations vs ONNX Runtime dynamic int8 (size, cosine, latency).",
        "4 configurations, 3 timing rounds (the ONNX export is cached after the first run).",
        ("compress",),
        (
            _threads(1, "torch and ONNX Runtime threads."),
            _option("onnx", bool, True, "Measure the ONNX Runtime peer."),
            _rounds(),
        ),
    ),
    Bench(
        "compress-experts",
        "compress_experts",
        "PiMoE digits classifier: test accuracy after dropping / merging experts (with and without distillation).",
        "One seed, shorter training (~15 s on an idle machine).",
        ("meta",),
    ),
    Bench(
        "cache",
        "cache",
        "Cache policies (FIFO/LRU/LFU/TinyLFU) vs Belady's MIN on Zipf traces; hit/miss/disk-hit costs.",
        "One Zipf trace, 10k requests, 3 timing rounds (~3 s).",
        ("serve",),
    ),
    Bench(
        "serve",
        "serve",
        "Loopback HTTP load (32 concurrent, Zipf prompts): one-by-one vs batching vs batching+cache.",
        "300 requests per mode instead of 2,000 (~25 s).",
        ("serve",),
    ),
    Bench(
        "federated",
        "federated",
        "Centralized vs 100-client FedAvg vs FedProx, IID vs non-IID, 0% and 30% dropout, sklearn digits.",
        "Fewer rounds and only the non-IID runs, in process (no Ray start).",
        ("federated",),
        (
            _option(
                "backend",
                str | None,
                None,
                "ray or inprocess (default: inprocess with --quick, else ray).",
                click_type=click.Choice(["ray", "inprocess"]),
            ),
        ),
        "Write the results here as JSON (PNG next to it).",
    ),
    Bench(
        "federated-robust",
        "federated_robust",
        "Digits federation under 10%/30% malicious clients: FedAvg vs screening, median, trimmed mean, norm bounding.",
        "Fewer rounds and attacks.",
        ("federated",),
    ),
    Bench(
        "privacy",
        "privacy",
        "DP-SGD accuracy at ε 1/3/8 vs non-private; secure-aggregation and CKKS aggregation error, time and bytes.",
        "1 seed, 10 DP epochs, 10-client secure aggregation only (~20 s of CPU).",
        ("privacy", "federated"),
        (),
        "Write the results here as JSON (PNG next to it).",
    ),
    Bench(
        "meta",
        "meta",
        "MAML vs pretrained on the MAML paper's sinusoids; 5-way digits (ProtoNet, MAML); EWC/replay.",
        "K=10 only, 600 meta-steps, 200 training episodes (~1-2 min).",
        ("meta",),
        (
            _option(
                "plot_path",
                Path | None,
                None,
                "Write the sinusoid MSE-vs-steps plot here (PNG).",
                "--plot",
            ),
        ),
    ),
    Bench(
        "fusion",
        "fusion",
        "Two-sensor digits: each sensor alone vs concat/gated/FiLM/cross-attention/MoE fusion; retrieval recall@k.",
        "15 epochs, one seed, 30 contrastive epochs (~1 min).",
        ("meta",),
    ),
    Bench(
        "search",
        "search",
        "Multi-objective TPE vs random search at equal trial budgets: hypervolume, predictor Spearman.",
        "Digits only, 10 trials per sampler, 1 seed (~1 min).",
        ("search",),
        (
            _option(
                "seeds",
                int | None,
                None,
                "Repeats with different seeds (default: 1 quick, 3 full).",
                min=1,
            ),
        ),
        "Write the results here as JSON (plots next to it).",
    ),
)
"""Every ``pimoe bench`` command, in the order ``pimoe bench --help`` lists them."""


def _bench_command(bench: Bench) -> Callable[..., None]:
    """A typer command for ``bench``: checks its extras, then runs its module's ``main``."""

    def command(**kwargs: Any) -> None:
        for extra in bench.extras:
            check_extra(extra, f"pimoe bench {bench.name}")
        importlib.import_module(f"pimoe.bench.{bench.module}").main(**kwargs)

    common = (
        _option("quick", bool, False, bench.quick),
        _option("json_path", Path | None, None, bench.json_help, "--json"),
    )
    parameters = (*common, *bench.options)
    command.__signature__ = inspect.Signature(list(parameters))  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = bench.summary
    return command


for _bench in BENCHMARKS:
    bench_app.command(_bench.name)(_bench_command(_bench))
