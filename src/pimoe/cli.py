"""The ``pimoe`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="pimoe: build, compress, serve and train Mixture-of-Experts models.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks; each prints ratios against a peer measured in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.command()
def demo(
    steps: Annotated[int, typer.Option(min=1, help="Training steps for each of the two models.")] = 600,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Folder to save the trained model and results JSON.")] = None,
) -> None:
    """Train a small PiMoE language model and its dense twin on Python's bundled docs; compare them."""
    import torch

    from pimoe.demo import run_demo

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA was requested but torch.cuda.is_available() is False", param_hint="--device")
    run_demo(steps=steps, device=device, seed=seed, out_dir=str(out) if out else None)


@app.command()
def serve(
    model_path: Annotated[Optional[Path], typer.Argument(exists=True, show_default=False, help="Same as --model.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", exists=True, help="A PiMoELM safetensors file (from `pimoe save-demo-model PATH` or `pimoe demo --out DIR`) or a Hugging Face encoder folder (e.g. all-MiniLM-L6-v2).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name in requests; default: the file name without extension.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most requests per forward pass.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest wait for a batch to fill, in ms.")] = 5.0,
    cache_size: Annotated[int, typer.Option(min=0, help="Entries of the LRU inference cache (0: off).")] = 0,
) -> None:
    """Serve a saved PiMoELM or a HF encoder folder over HTTP (POST /v1/infer, GET /healthz, GET /metrics)."""
    from pimoe.infer.server import serve as run_server

    if (model_path is None) == (model is None):
        raise typer.BadParameter("give the model file once: `--model PATH` or a positional PATH", param_hint="--model")
    path = model if model is not None else model_path
    assert path is not None
    try:
        run_server(path, name=name, host=host, port=port, max_batch_size=max_batch_size,
                   max_wait_ms=max_wait_ms, cache_size=cache_size)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--model") from err


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


@bench_app.command("expert-parallel")
def bench_expert_parallel(
    quick: Annotated[bool, typer.Option(help="512 tokens per process, 3 rounds (~25 s).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here as JSON.")] = None,
    rounds: Annotated[Optional[int], typer.Option(min=1, help="Timing rounds (median is reported).")] = None,
) -> None:
    """Expert parallelism on 1, 2, 4 local gloo processes vs the single-process layer (tokens/s, bytes/token)."""
    from pimoe.bench.expert_parallel import main

    main(quick=quick, json_path=json_path, rounds=rounds)


if __name__ == "__main__":
    app()
