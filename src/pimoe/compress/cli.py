"""``pimoe compress MODEL OUT``: compress a saved model with an ArchitectureConfig and write a report.

Wired into the ``pimoe`` command by :mod:`pimoe.cli`. Settings come from ``--config`` (a JSON or
TOML file of :class:`~pimoe.compress.ArchitectureConfig` fields) and/or flags; a flag overrides the
file. Without a config file only the steps asked for by flags run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

# flag name -> (config field set to the flag's value, enable flag turned on by it)
_STEP_FLAGS = {
    "sparsity": ("sparsity_ratio", "enable_pruning"),
    "low_rank": ("compression_ratio", "enable_low_rank"),
    "bits": ("quantization_bits", "enable_quantization"),
    "prune_heads": ("head_prune_ratio", "enable_head_pruning"),
    "prune_neurons": ("neuron_prune_ratio", "enable_neuron_pruning"),
    "drop_experts": ("expert_drop_ratio", "enable_expert_drop"),
    "merge_experts": ("experts_after_merge", "enable_expert_merge"),
}


def build_config(config_file: Path | None, flags: dict[str, Any]) -> Any:
    """The :class:`ArchitectureConfig` from a config file (optional) and flags (``None``: not given)."""
    from pimoe.compress.saved import config_from_dict, read_config_file

    values: dict[str, Any] = dict(read_config_file(config_file)) if config_file else {}
    if config_file is None:
        values.update(enable_pruning=False, enable_quantization=False)
    for flag, value in flags.items():
        if value is None:
            continue
        if flag in _STEP_FLAGS:
            field, enable = _STEP_FLAGS[flag]
            values[field] = value
            values[enable] = True
        else:
            values[flag] = value
    config = config_from_dict(values)
    if not config.enabled_steps():
        raise ValueError(
            "no step enabled: give a step flag (--bits, --sparsity, --prune-heads, ...) or a config file"
        )
    return config


def compress(
    model_path: Annotated[
        Path,
        typer.Argument(
            exists=True, help="A Hugging Face encoder folder or a PiMoELM .safetensors file."
        ),
    ],
    out: Annotated[
        Path,
        typer.Argument(
            file_okay=False, help="Folder for model.safetensors, recipe.json, report.md/.json/.png."
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            help="JSON/TOML file of ArchitectureConfig fields.",
        ),
    ] = None,
    bits: Annotated[
        int | None,
        typer.Option(
            help="Quantize: 8 (int8: dynamic, 8-bit activations, int4 word embeddings unless told otherwise), 4 (int4 weight-only), 16 (bfloat16)."
        ),
    ] = None,
    mode: Annotated[str | None, typer.Option(help="int8 mode: dynamic or weight_only.")] = None,
    full_range: Annotated[
        bool | None,
        typer.Option(
            "--full-range/--reduced-range",
            help="Dynamic int8 activations with 8 bits (default) or torch.ao's 7.",
        ),
    ] = None,
    embedding_bits: Annotated[
        int | None,
        typer.Option(
            help="Word embeddings to 8 or 4 bits, 0 to keep them in float (default with --bits 8: 4)."
        ),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(help="Global magnitude pruning of Linear weights, fraction in [0, 1)."),
    ] = None,
    low_rank: Annotated[
        float | None,
        typer.Option(
            help="Low-rank factorization keeping this fraction of each Linear's parameters, in (0, 1]."
        ),
    ] = None,
    prune_heads: Annotated[
        float | None,
        typer.Option(help="Remove this fraction of the attention heads (structured), in (0, 1)."),
    ] = None,
    prune_neurons: Annotated[
        float | None,
        typer.Option(help="Remove this fraction of dense FFN neurons (structured), in (0, 1)."),
    ] = None,
    drop_experts: Annotated[
        float | None,
        typer.Option(help="Drop this fraction of each PiMoE layer's experts, in (0, 1)."),
    ] = None,
    merge_experts: Annotated[
        int | None, typer.Option(help="Merge each PiMoE layer's experts down to this many.")
    ] = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(help="fnmatch pattern of module names to leave alone (repeatable)."),
    ] = None,
    repeats: Annotated[
        int, typer.Option(min=1, help="Latency repeats per measurement (median).")
    ] = 5,
) -> None:
    """Compress a model, save it (loads back with pimoe.compress.load_compressed) and write a report."""
    from rich.console import Console

    from pimoe.compress.optimizer import ArchitectureOptimizer
    from pimoe.compress.saved import load_source, save_compressed
    from pimoe.io import atomic_write_text

    flags = {
        "bits": bits,
        "quantization_mode": mode,
        "int8_full_range": full_range,
        "embedding_bits": embedding_bits,
        "sparsity": sparsity,
        "low_rank": low_rank,
        "prune_heads": prune_heads,
        "prune_neurons": prune_neurons,
        "drop_experts": drop_experts,
        "merge_experts": merge_experts,
        "skip": skip or None,
        "latency_repeats": repeats,
    }
    try:
        cfg = build_config(config, flags)
        source = load_source(model_path)
        result = ArchitectureOptimizer(cfg).optimize(source.model, source.example_inputs)
        save_compressed(out, result.model, source)
    except ValueError as error:  # bad settings or model file: one line, no traceback
        typer.echo(f"pimoe compress: {' '.join(str(error).split())}", err=True)
        raise typer.Exit(2) from error
    report = result.report
    atomic_write_text(
        out / "report.md", f"# Compression of {source.path.name}\n\n{report.to_markdown()}"
    )
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2))
    report.plot(out / "report.png")
    console = Console()
    console.print(report.table())
    console.print(
        f"wrote {out}/model.safetensors ({(out / 'model.safetensors').stat().st_size:,} bytes), recipe.json, "
        "report.md, report.json, report.png"
    )
