"""``pimoe serve`` (the HTTP server, :func:`pimoe.infer.server.serve`) and ``pimoe
save-demo-model`` (a small model to serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve(
    model_path: Annotated[
        str | None, typer.Argument(show_default=False, help="Same as --model.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="A PiMoELM safetensors file (from `pimoe save-demo-model PATH` or `pimoe demo --out DIR`), a Hugging Face encoder folder (e.g. all-MiniLM-L6-v2), a `pimoe compress` output folder, a Hugging Face causal-LM folder or a pretrained name (smollm2-135m-instruct). Language models also get the OpenAI routes /v1/completions and /v1/chat/completions.",
        ),
    ] = None,
    routers: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Upcycle the causal LM into PiMoE layers with routers saved by pimoe.models.save_routers (as `pimoe demo` does).",
        ),
    ] = None,
    chain: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Serve the computation chain saved by `pimoe chain train --out DIR` on the OpenAI routes (instead of a model).",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Model name in requests; default: the file name without extension."),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on (a non-loopback address without --api-key prints a warning)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Most requests per forward pass.")
    ] = 32,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="Longest wait for a batch to fill, in ms.")
    ] = 5.0,
    cache_size: Annotated[
        int, typer.Option(min=0, help="Entries of the LRU inference cache (0: off).")
    ] = 0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="PIMOE_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on every path but /healthz (401 otherwise). Prefer the PIMOE_API_KEY variable: a command line is visible to other users.",
        ),
    ] = None,
    docs: Annotated[
        bool,
        typer.Option(help="Serve the API docs (/docs, /redoc, /openapi.json); off by default."),
    ] = False,
    ssl_certfile: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="TLS certificate (PEM); needs --ssl-keyfile."
        ),
    ] = None,
    ssl_keyfile: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="TLS private key (PEM); needs --ssl-certfile."
        ),
    ] = None,
    max_body_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Largest request body; larger (declared or counted while reading) is answered 413.",
        ),
    ] = 8 * 2**20,
    max_total_body_bytes: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="Most body bytes all requests in flight hold together; a request that would pass it is answered 503 (default: 32 x --max-body-bytes; at least --max-body-bytes).",
        ),
    ] = None,
    body_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds from a request's headers to the end of its body; slower is answered 408.",
        ),
    ] = 30.0,
    header_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a connection may take to send a request's headers; then it is closed.",
        ),
    ] = 10.0,
    max_header_bytes: Annotated[
        int,
        typer.Option(
            min=1024,
            help="Bytes a connection may send without completing a request's headers; then it is closed.",
        ),
    ] = 64 * 1024,
    timeout_keep_alive: Annotated[
        float, typer.Option(min=0.001, help="Seconds an idle keep-alive connection stays open.")
    ] = 5.0,
    limit_concurrency: Annotated[
        int,
        typer.Option(
            min=0,
            help="Most open connections and most requests in flight; beyond either, 503 (0: no limit).",
        ),
    ] = 512,
    timeout_graceful_shutdown: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="On SIGTERM/Ctrl-C, seconds to let running requests finish before cancelling them.",
        ),
    ] = 10.0,
    max_num_batched_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Text generation: most tokens one step processes (one per running stream plus prompt tokens), as vLLM's option of that name.",
        ),
    ] = 512,
    enable_chunked_prefill: Annotated[
        bool,
        typer.Option(
            help="Text generation: prefill a prompt longer than the step's budget in chunks over several steps, so running streams keep decoding (vLLM's option); needs --max-num-batched-tokens >= --max-batch-size.",
        ),
    ] = False,
    pack_experts: Annotated[
        bool,
        typer.Option(
            help="Prepack the language model's expert weights for CPU inference (pimoe.moe.pack_experts_: faster from a few rows per expert, the expert weights' memory again).",
        ),
    ] = False,
) -> None:
    """Serve a model over HTTP (POST /v1/infer, GET /healthz, GET /metrics); language models also get OpenAI-style
    text generation with continuous batching (GET /v1/models, POST /v1/completions, POST /v1/chat/completions)."""
    from pimoe.infer.server import ServerLimits
    from pimoe.infer.server import serve as run_server

    if [model_path, model, chain].count(None) != 2:
        raise typer.BadParameter(
            "give one of `--model PATH`, a positional PATH or `--chain DIR`", param_hint="--model"
        )
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise typer.BadParameter(
            "TLS needs both --ssl-certfile and --ssl-keyfile", param_hint="--ssl-certfile"
        )
    if max_total_body_bytes is not None and max_total_body_bytes < max_body_bytes:
        raise typer.BadParameter(
            f"--max-total-body-bytes ({max_total_body_bytes}) must be >= --max-body-bytes "
            f"({max_body_bytes}): no request of the largest size could be read",
            param_hint="--max-total-body-bytes",
        )
    path = model if model is not None else model_path
    from pimoe.models.pretrained import REGISTRY

    if path is not None and path not in REGISTRY and not Path(path).exists():
        raise typer.BadParameter(
            f"{path} does not exist and is not a pretrained name ({sorted(REGISTRY)})",
            param_hint="--model",
        )
    try:  # a setting or model file that cannot be served: one line, no traceback
        limits = ServerLimits(
            limit_concurrency=limit_concurrency or None,
            timeout_keep_alive_s=timeout_keep_alive,
            header_timeout_s=header_timeout,
            max_header_bytes=max_header_bytes,
            timeout_graceful_shutdown_s=timeout_graceful_shutdown,
        )
        run_server(
            path,
            name=name,
            host=host,
            port=port,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            cache_size=cache_size,
            api_key=api_key,
            docs=docs,
            max_body_bytes=max_body_bytes,
            max_total_body_bytes=max_total_body_bytes,
            body_timeout_s=body_timeout,
            limits=limits,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            routers=routers,
            chain=chain,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            pack_experts=pack_experts,
        )
    except ValueError as err:
        typer.echo(f"pimoe serve: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(2) from err


def save_demo_model(
    path: Annotated[
        Path, typer.Argument(dir_okay=False, help="Where to write the model (a .safetensors file).")
    ],
    steps: Annotated[
        int, typer.Option(min=0, help="Training steps on pydoc text (0: save the untrained model).")
    ] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a small byte-level PiMoELM (briefly trained on Python's docs) for `pimoe serve --model PATH`."""
    from pimoe.infer.demo_model import save_demo_model as write_model

    result = write_model(path, steps=steps, seed=seed)
    typer.echo(
        f"wrote {path} ({int(result['params']):,} parameters, {steps} steps, held-out loss {result['val_loss']:.3f})"
    )
