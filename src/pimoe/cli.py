"""The ``pimoe`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# Subcommands defined next to their subsystems; these modules import only typer at load time
# (Optuna, Flower/Ray and the models load when the command runs).
from pimoe.compress.cli import compress as compress_command
from pimoe.compute.cli import chain_app
from pimoe.federated.cli import federate as federate_command
from pimoe.search.cli import search as search_command

app = typer.Typer(help="pimoe: build, compress, serve and train Mixture-of-Experts models.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks; each prints ratios against a peer measured in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(chain_app, name="chain")
app.command("search")(search_command)
app.command("federate")(federate_command)
app.command("compress")(compress_command)


@app.command()
def demo(
    scratch: Annotated[bool, typer.Option(help="Run the from-scratch demo instead: train a small byte-level PiMoE LM and its dense twin (implied by --steps or --config).")] = False,
    model: Annotated[str, typer.Option(help="Pretrained model: a name known to pimoe.models.load_pretrained or a local Hugging Face folder.")] = "smollm2-135m-instruct",
    top_k: Annotated[int, typer.Option(min=1, max=8, help="Experts per token of the split model (of 8).")] = 4,
    retrain: Annotated[bool, typer.Option(help="Cluster and train the routers again instead of loading them from the cache.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="torch threads for the SmolLM2 demo.")] = 2,
    steps: Annotated[Optional[int], typer.Option(min=1, help="From-scratch demo: training steps for each of the two models (default 600).")] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Folder to save the results JSON (and, from scratch, the trained model).")] = None,
    computation: Annotated[bool, typer.Option(help="Add the computation-experts stage: LM alone vs PiMoE hand-off vs tool call (~1-2 min).")] = False,
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="From-scratch demo: chosen_config.json of a `pimoe search --task lm` run: train that model instead of the default.")] = None,
) -> None:
    """Split the pretrained SmolLM2-135M-Instruct into experts and compare it with the dense model on
    Python's bundled docs (perplexity, routing, an answer from each); --scratch trains a small PiMoE LM
    and its dense twin instead."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA was requested but torch.cuda.is_available() is False", param_hint="--device")
    if not (scratch or steps is not None or config is not None):
        from dataclasses import replace

        from pimoe.demo_pretrained import PretrainedDemoSettings, run_pretrained_demo

        settings = replace(PretrainedDemoSettings(), model=model, top_k=top_k, seed=seed)
        run_pretrained_demo(settings, device=device, threads=threads, retrain=retrain,
                            out_dir=str(out) if out else None, computation=computation)
        return
    from pimoe.demo import run_demo

    model_config = None
    if config is not None:
        from pimoe.search import load_config

        try:
            model_config = load_config(config)
            if model_config.vocab_size != 256:
                raise ValueError(f"vocab_size is {model_config.vocab_size}; the demo is byte-level (256): "
                                 "use a config from `pimoe search --task lm`")
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--config") from err
    run_demo(steps=steps or 600, device=device, seed=seed, out_dir=str(out) if out else None, computation=computation,
             config=model_config)


@app.command()
def serve(
    model_path: Annotated[Optional[str], typer.Argument(show_default=False, help="Same as --model.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="A PiMoELM safetensors file (from `pimoe save-demo-model PATH` or `pimoe demo --out DIR`), a Hugging Face encoder folder (e.g. all-MiniLM-L6-v2), a `pimoe compress` output folder, a Hugging Face causal-LM folder or a pretrained name (smollm2-135m-instruct). Language models also get the OpenAI routes /v1/completions and /v1/chat/completions.")] = None,
    routers: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="Upcycle the causal LM into PiMoE layers with routers saved by pimoe.models.save_routers (as `pimoe demo` does).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name in requests; default: the file name without extension.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (a non-loopback address without --api-key prints a warning).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most requests per forward pass.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest wait for a batch to fill, in ms.")] = 5.0,
    cache_size: Annotated[int, typer.Option(min=0, help="Entries of the LRU inference cache (0: off).")] = 0,
    api_key: Annotated[Optional[str], typer.Option(envvar="PIMOE_API_KEY", show_default=False, help="Require 'Authorization: Bearer KEY' on every path but /healthz (401 otherwise). Prefer the PIMOE_API_KEY variable: a command line is visible to other users.")] = None,
    docs: Annotated[bool, typer.Option(help="Serve the API docs (/docs, /redoc, /openapi.json); off by default.")] = False,
    ssl_certfile: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="TLS certificate (PEM); needs --ssl-keyfile.")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="TLS private key (PEM); needs --ssl-certfile.")] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body; larger (declared or counted while reading) is answered 413.")] = 8 * 2**20,
    body_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds from a request's headers to the end of its body; slower is answered 408.")] = 30.0,
    header_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a connection may take to send a request's headers; then it is closed.")] = 10.0,
    max_header_bytes: Annotated[int, typer.Option(min=1024, help="Bytes a connection may send without completing a request's headers; then it is closed.")] = 64 * 1024,
    timeout_keep_alive: Annotated[float, typer.Option(min=0.001, help="Seconds an idle keep-alive connection stays open.")] = 5.0,
    limit_concurrency: Annotated[int, typer.Option(min=0, help="Most open connections and most requests in flight; beyond either, 503 (0: no limit).")] = 512,
    timeout_graceful_shutdown: Annotated[float, typer.Option(min=0.001, help="On SIGTERM/Ctrl-C, seconds to let running requests finish before cancelling them.")] = 10.0,
) -> None:
    """Serve a model over HTTP (POST /v1/infer, GET /healthz, GET /metrics); language models also get OpenAI-style
    text generation with continuous batching (GET /v1/models, POST /v1/completions, POST /v1/chat/completions)."""
    from pimoe.infer.server import ServerLimits
    from pimoe.infer.server import serve as run_server

    if (model_path is None) == (model is None):
        raise typer.BadParameter("give the model file once: `--model PATH` or a positional PATH", param_hint="--model")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise typer.BadParameter("TLS needs both --ssl-certfile and --ssl-keyfile", param_hint="--ssl-certfile")
    path = model if model is not None else model_path
    assert path is not None
    from pimoe.models.pretrained import REGISTRY

    if path not in REGISTRY and not Path(path).exists():
        raise typer.BadParameter(f"{path} does not exist and is not a pretrained name ({sorted(REGISTRY)})",
                                 param_hint="--model")
    limits = ServerLimits(limit_concurrency=limit_concurrency or None, timeout_keep_alive_s=timeout_keep_alive,
                          header_timeout_s=header_timeout, max_header_bytes=max_header_bytes,
                          timeout_graceful_shutdown_s=timeout_graceful_shutdown)
    try:
        run_server(path, name=name, host=host, port=port, max_batch_size=max_batch_size,
                   max_wait_ms=max_wait_ms, cache_size=cache_size, api_key=api_key, docs=docs,
                   max_body_bytes=max_body_bytes, body_timeout_s=body_timeout, limits=limits,
                   ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, routers=routers)
    except ValueError as err:  # a model file that cannot be served: one line, no traceback
        typer.echo(f"pimoe serve: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(2) from err


@app.command("save-demo-model")
def save_demo_model(
    path: Annotated[Path, typer.Argument(dir_okay=False, help="Where to write the model (a .safetensors file).")],
    steps: Annotated[int, typer.Option(min=0, help="Training steps on pydoc text (0: save the untrained model).")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a small byte-level PiMoELM (briefly trained on Python's docs) for `pimoe serve --model PATH`."""
    from pimoe.infer.demo_model import save_demo_model as write_model

    result = write_model(path, steps=steps, seed=seed)
    typer.echo(f"wrote {path} ({int(result['params']):,} parameters, {steps} steps, held-out loss {result['val_loss']:.3f})")


@bench_app.command("moe")
def bench_moe(
    quick: Annotated[bool, typer.Option(help="Small sizes (512 and 2048 tokens, 3 rounds).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    rounds: Annotated[Optional[int], typer.Option(min=1, help="Timing rounds (median is reported).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 2,
) -> None:
    """PiMoE layer vs HF MixtralSparseMoeBlock vs the dense limit (d=512, ffn=1024, 8 experts, top-2)."""
    from pimoe.bench.moe_layer import main

    main(quick=quick, json_path=json_path, rounds=rounds, threads=threads)


@bench_app.command("cache")
def bench_cache(
    quick: Annotated[bool, typer.Option(help="One Zipf trace, 10k requests, 3 timing rounds (~3 s).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """Cache policies (FIFO/LRU/LFU/TinyLFU) vs Belady's MIN on Zipf traces; hit/miss/disk-hit costs."""
    from pimoe.bench.cache import main

    main(quick=quick, json_path=json_path)


@bench_app.command("serve")
def bench_serve(
    quick: Annotated[bool, typer.Option(help="300 requests per mode instead of 2,000 (~25 s).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """Loopback HTTP load (32 concurrent, Zipf prompts): one-by-one vs batching vs batching+cache."""
    from pimoe.bench.serve import main

    main(quick=quick, json_path=json_path)


@bench_app.command("computation")
def bench_computation(
    quick: Annotated[bool, typer.Option(help="800 training steps, 40 held-out problems (~1-2 min).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON (and a PNG plot next to it).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
    calls: Annotated[str, typer.Option(help="Call format the text expert learns: 'reference' (#1*#2, resolved by text-to-computation) or 'expression' (literal digits).")] = "reference",
    model: Annotated[Optional[str], typer.Option(help="'smollm2': run on the frozen SmolLM2-135M-Instruct (word problems; adds a two-call agent).")] = None,
) -> None:
    """PiMoE computation experts on held-out arithmetic: LM alone vs token-level hand-off vs tool call."""
    from pimoe.bench.computation import main

    if calls not in ("reference", "expression"):
        raise typer.BadParameter(f"must be 'reference' or 'expression', got {calls!r}", param_hint="--calls")
    if model is not None and model != "smollm2":
        raise typer.BadParameter(f"must be 'smollm2', got {model!r}", param_hint="--model")
    main(quick=quick, json_path=json_path, threads=threads, calls=calls, model=model)  # type: ignore[arg-type]


@bench_app.command("expert-parallel")
def bench_expert_parallel(
    quick: Annotated[bool, typer.Option(help="512 tokens per process, 3 rounds (~25 s).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    rounds: Annotated[Optional[int], typer.Option(min=1, help="Timing rounds (median is reported).")] = None,
) -> None:
    """Expert parallelism on 1, 2, 4 local gloo processes vs the single-process layer (tokens/s, bytes/token)."""
    from pimoe.bench.expert_parallel import main

    main(quick=quick, json_path=json_path, rounds=rounds)


@bench_app.command("search")
def bench_search(
    quick: Annotated[bool, typer.Option(help="Digits only, 10 trials per sampler, 1 seed (~1 min).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON (plots next to it).")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Repeats with different seeds (default: 1 quick, 3 full).")] = None,
) -> None:
    """Multi-objective TPE vs random search at equal trial budgets: hypervolume, predictor Spearman."""
    from pimoe.bench.search import main

    main(quick=quick, json_path=json_path, seeds=seeds)


@bench_app.command("federated")
def bench_federated(
    quick: Annotated[bool, typer.Option(help="Fewer rounds and only the non-IID runs, in process (no Ray start).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON (PNG next to it).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="ray or inprocess (default: inprocess with --quick, else ray).")] = None,
) -> None:
    """Centralized vs 100-client FedAvg vs FedProx, IID vs non-IID, 0% and 30% dropout, sklearn digits."""
    from pimoe.bench.federated import main

    main(quick=quick, json_path=json_path, backend=backend)


@bench_app.command("privacy")
def bench_privacy(
    quick: Annotated[bool, typer.Option(help="1 seed, 10 DP epochs, 10-client secure aggregation only (~20 s of CPU).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON (PNG next to it).")] = None,
) -> None:
    """DP-SGD accuracy at ε 1/3/8 vs non-private; secure-aggregation and CKKS aggregation error, time and bytes."""
    from pimoe.bench.privacy import main

    main(quick=quick, json_path=json_path)


@bench_app.command("compress")
def bench_compress(
    quick: Annotated[bool, typer.Option(help="4 configurations, 3 timing rounds (the ONNX export is cached after the first run).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch and ONNX Runtime threads.")] = 1,
    onnx: Annotated[bool, typer.Option(help="Measure the ONNX Runtime peer.")] = True,
    rounds: Annotated[Optional[int], typer.Option(min=1, help="Timing rounds (median is reported).")] = None,
) -> None:
    """all-MiniLM-L6-v2: pimoe.compress configurations vs ONNX Runtime dynamic int8 (size, cosine, latency)."""
    from pimoe.bench.compress import main

    main(quick=quick, json_path=json_path, threads=threads, onnx=onnx, rounds=rounds)


@bench_app.command("meta")
def bench_meta(
    quick: Annotated[bool, typer.Option(help="K=10 only, 600 meta-steps, 200 training episodes (~1-2 min).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write the sinusoid MSE-vs-steps plot here (PNG).")] = None,
) -> None:
    """MAML vs pretrained on the MAML paper's sinusoids; 5-way digits (ProtoNet, MAML); EWC/replay."""
    from pimoe.bench.meta import main

    main(quick=quick, json_path=json_path, plot_path=plot)


@bench_app.command("fusion")
def bench_fusion(
    quick: Annotated[bool, typer.Option(help="15 epochs, one seed, 30 contrastive epochs (~1 min).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """Two-sensor digits: each sensor alone vs concat/gated/FiLM/cross-attention/MoE fusion; retrieval recall@k."""
    from pimoe.bench.fusion import main

    main(quick=quick, json_path=json_path)


@bench_app.command("compress-experts")
def bench_compress_experts(
    quick: Annotated[bool, typer.Option(help="One seed, shorter training (~15 s on an idle machine).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """PiMoE digits classifier: test accuracy after dropping / merging experts (with and without distillation)."""
    from pimoe.bench.compress_experts import main

    main(quick=quick, json_path=json_path)


@bench_app.command("kv-cache")
def bench_kv_cache(
    quick: Annotated[bool, typer.Option(help="Batch 1 only, one round.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """PiMoELM greedy decoding of 256 tokens with the KV cache vs the uncached loop (same outputs)."""
    from pimoe.bench.kv_cache import main

    main(quick=quick, json_path=json_path)


@bench_app.command("federated-robust")
def bench_federated_robust(
    quick: Annotated[bool, typer.Option(help="Fewer rounds and attacks.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """Digits federation under 10%/30% malicious clients: FedAvg vs screening, median, trimmed mean, norm bounding."""
    from pimoe.bench.federated_robust import main

    main(quick=quick, json_path=json_path)


@bench_app.command("hf-backend")
def bench_hf_backend(
    quick: Annotated[bool, typer.Option(help="Fewer shapes and rounds.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """transformers MoE blocks with experts_implementation='pimoe' vs 'grouped_mm' (fwd, fwd+bwd), after the tiny-family check."""
    from pimoe.bench.hf_backend import main

    main(quick=quick, json_path=json_path)


@bench_app.command("generate")
def bench_generate(
    quick: Annotated[bool, typer.Option(help="32 new tokens, fewer requests, a 2,000-request soak.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    soak_requests: Annotated[Optional[int], typer.Option(help="Requests of the loopback soak (default 10,000; 2,000 with --quick).")] = None,
) -> None:
    """SmolLM2 served with continuous batching at 1/8/32 streams vs HF generate (sequential and static batches); loopback soak."""
    from pimoe.bench.generate import main

    main(quick=quick, json_path=json_path, soak_requests=soak_requests)


@bench_app.command("models")
def bench_models(
    quick: Annotated[bool, typer.Option(help="2,048 held-out tokens, 128 prefill and 16 decode tokens, 1 timing round.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
) -> None:
    """SmolLM2-135M dense vs split into 8 experts (k=4, k=2): load time, perplexity, tokens/s; HF-families equivalence."""
    from pimoe.bench.models import main

    main(quick=quick, json_path=json_path)

if __name__ == "__main__":
    app()
