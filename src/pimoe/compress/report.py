"""Measurements of a model before and after each compression step: size, latency, fidelity."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from pimoe.compress.distill import Batch, call_model, default_output_fn
from pimoe.compress.quantize import saved_bytes
from pimoe.io import save_png
from pimoe.tables import Table

FidelityFn = Callable[[Tensor, Tensor], float]


def cosine_fidelity(reference: Tensor, output: Tensor) -> float:
    """Mean cosine similarity of the flattened outputs per example (first dimension)."""
    ref, out = reference.float().flatten(1), output.float().flatten(1)
    return float(F.cosine_similarity(out, ref, dim=-1).mean())


def mse_fidelity(reference: Tensor, output: Tensor) -> float:
    """Mean squared error to the reference (lower is better, 0 for identical outputs)."""
    return float(F.mse_loss(output.float(), reference.float()))


def agreement_fidelity(reference: Tensor, output: Tensor) -> float:
    """Fraction of positions whose argmax over the last dimension matches the reference's."""
    return float((output.argmax(-1) == reference.argmax(-1)).float().mean())


FIDELITY_FNS: dict[str, FidelityFn] = {
    "cosine": cosine_fidelity,
    "mse": mse_fidelity,
    "accuracy": agreement_fidelity,
}


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(elements, nonzero elements) of every tensor in ``model.state_dict()``, tied tensors once.

    Packed parameters of torch.ao quantized modules (tuples of tensors) are unpacked and counted;
    a packed int4 byte counts as one element although it holds two weights.
    """
    total = nonzero = 0
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    stack: list[Any] = list(model.state_dict().values())
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, Tensor):
            view = (item.data_ptr(), tuple(item.shape), tuple(item.stride()))
            if item.numel() and view in seen:  # a tied (shared) tensor counts once
                continue
            seen.add(view)
            dense = item.dequantize() if item.is_quantized else item
            total += dense.numel()
            nonzero += int(torch.count_nonzero(dense))
    return total, nonzero


def safetensors_bytes(model: nn.Module) -> int | None:
    """Size of the state dict saved with safetensors, or ``None`` when it cannot be saved.

    torch.ao quantized modules hold packed parameters and quantized tensors that safetensors does
    not store; tied (shared) tensors are saved once.
    """
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()  # (storage pointer, offset) of the tensors already stored
    for name, value in model.state_dict().items():
        if not isinstance(value, Tensor) or value.is_quantized:
            return None
        key = (value.untyped_storage().data_ptr(), int(value.storage_offset()))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = value.detach().contiguous()
    try:
        return len(safetensors_save(tensors))
    except (ValueError, RuntimeError, TypeError):
        return None


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def cast_inputs(batch: Batch, dtype: torch.dtype | None) -> Batch:
    """Cast the floating-point tensors of ``batch`` to ``dtype`` (no-op when ``dtype`` is None)."""
    if dtype is None:
        return batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(cast_inputs(item, dtype) for item in batch)
    if isinstance(batch, Tensor) and batch.is_floating_point():
        return batch.to(dtype)
    return batch


@torch.inference_mode()
def run_model(
    model: nn.Module, inputs: Batch, output_fn: Callable[[Any], Tensor] = default_output_fn
) -> Tensor:
    """Eval-mode output of ``model`` on ``inputs`` cast to the model's float dtype, as float32."""
    model.eval()
    return output_fn(call_model(model, cast_inputs(inputs, _model_dtype(model)))).float()


@torch.inference_mode()
def median_latency_ms(model: nn.Module, inputs: Batch, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in milliseconds of ``repeats`` eval-mode calls after ``warmup`` calls."""
    model.eval()
    inputs = cast_inputs(inputs, _model_dtype(model))
    for _ in range(warmup):
        call_model(model, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call_model(model, inputs)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


@dataclass
class StepResult:
    """The model's measurements after one step (``name="before"`` for the original);
    ``latency_ms`` and ``fidelity`` are ``None`` when no example inputs were given."""

    name: str
    params: int
    nonzero_params: int
    bytes_torch_save: int
    bytes_safetensors: int | None
    latency_ms: float | None
    fidelity: float | None
    note: str = ""
    left_in_float: list[str] = field(default_factory=list)


def measure(
    name: str,
    model: nn.Module,
    example_inputs: Batch | None = None,
    reference: Tensor | None = None,
    fidelity: FidelityFn | None = None,
    *,
    output_fn: Callable[[Any], Tensor] = default_output_fn,
    repeats: int = 10,
    note: str = "",
) -> StepResult:
    """Measure ``model``: sizes always; latency and fidelity (against the ``reference`` output)
    on ``example_inputs`` when they, ``reference`` and ``fidelity`` are given."""
    params, nonzero = param_counts(model)
    latency = score = None
    if example_inputs is not None and reference is not None and fidelity is not None:
        latency = median_latency_ms(model, example_inputs, repeats=repeats)
        score = fidelity(reference, run_model(model, example_inputs, output_fn))
    return StepResult(
        name=name,
        params=params,
        nonzero_params=nonzero,
        bytes_torch_save=saved_bytes(model),
        bytes_safetensors=safetensors_bytes(model),
        latency_ms=latency,
        fidelity=score,
        note=note,
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class CompressionReport:
    """One :class:`StepResult` per row: the original model first, then each applied step."""

    steps: list[StepResult] = field(default_factory=list)
    fidelity_metric: str = "cosine"

    @property
    def before(self) -> StepResult:
        """The original model's row."""
        return self.steps[0]

    @property
    def after(self) -> StepResult:
        """The last row (the returned model)."""
        return self.steps[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-serialisable)."""
        return {
            "fidelity_metric": self.fidelity_metric,
            "steps": [dataclasses.asdict(s) for s in self.steps],
        }

    def table(self) -> Table:
        """A rich table with one row per step; sizes also as a fraction of the original."""
        table = Table(title=f"compression (fidelity: {self.fidelity_metric})")
        for column in (
            "step",
            "params",
            "nonzero",
            "torch.save",
            "safetensors",
            "latency ms",
            "fidelity",
            "note",
        ):
            table.add_column(column, justify="left" if column in ("step", "note") else "right")
        base = self.before.bytes_torch_save
        for s in self.steps:
            st = "-" if s.bytes_safetensors is None else f"{s.bytes_safetensors:,}"
            table.add_row(
                s.name,
                f"{s.params:,}",
                f"{s.nonzero_params:,}",
                f"{s.bytes_torch_save:,} ({s.bytes_torch_save / base:.2f}x)",
                st,
                _fmt(s.latency_ms, ".3f"),
                _fmt(s.fidelity, ".4f"),
                s.note,
            )
        return table

    def to_markdown(self) -> str:
        """The report as a Markdown table (sizes also as a fraction of the original)."""
        base = self.before.bytes_torch_save
        lines = [
            f"| step | params | nonzero | torch.save bytes | size vs before | latency ms | {self.fidelity_metric} | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in self.steps:
            lines.append(
                f"| {s.name} | {s.params:,} | {s.nonzero_params:,} | {s.bytes_torch_save:,} | "
                f"{s.bytes_torch_save / base:.3f} | {_fmt(s.latency_ms, '.2f')} | {_fmt(s.fidelity, '.4f')} | {s.note} |"
            )
        for s in self.steps:
            if s.left_in_float:
                lines.append(
                    f"\nLeft in float after `{s.name}` (unsupported or skipped): "
                    + ", ".join(f"`{name}`" for name in s.left_in_float)
                )
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Write a PNG with three panels per step: torch.save bytes, fidelity, latency."""
        from matplotlib.figure import Figure

        names = [s.name for s in self.steps]
        panels: Sequence[tuple[str, list[float]]] = (
            ("torch.save bytes", [float(s.bytes_torch_save) for s in self.steps]),
            (f"fidelity ({self.fidelity_metric})", [s.fidelity or 0.0 for s in self.steps]),
            ("median latency (ms)", [s.latency_ms or 0.0 for s in self.steps]),
        )
        fig = Figure(figsize=(12, 3.5))
        axes = fig.subplots(1, 3)
        for ax, (title, values) in zip(axes, panels):
            ax.bar(range(len(names)), values, color="tab:blue")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_title(title)
        fig.tight_layout()
        path = Path(path)
        save_png(fig, path)
        return path
