"""What a search leaves behind: the Pareto front as a table and a PNG, and the chosen config.

The chosen configuration is saved as JSON (atomically) and read back by :func:`load_config`
(an :class:`~pimoe.moe.model.LMConfig` for ``PiMoELM`` / ``pimoe.demo.train_lm``) and
:func:`load_compression` (a :class:`Compression`; ``to_architecture_config`` turns it into the
settings of ``pimoe.compress.ArchitectureOptimizer``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pimoe.extras import extra_imports
from pimoe.tables import Table

with extra_imports("search", "pimoe.search"):
    import optuna
    from optuna.trial import FrozenTrial

from pimoe.compress.optimizer import ArchitectureConfig
from pimoe.io import atomic_write_text, save_png
from pimoe.moe.model import LMConfig
from pimoe.search.hypervolume import normalize
from pimoe.search.objective import OBJECTIVES
from pimoe.search.space import Compression, SearchSpace

CHOICE_FORMAT = "pimoe.search.choice/1"
# A chosen config is a model trained by ``pimoe demo --config`` on this machine's CPU: far past
# any search space, a crafted or careless file would otherwise ask for terabytes.
MAX_CHOICE_PARAMETERS = 10**9


CONFIG_LEGEND = (
    "L layers, d width, E experts, k top-k, f expert width, s shared experts, "
    "m PiMoE every m-th block | weights, p sparsity, r low-rank ratio"
)


def describe(params: dict, space: SearchSpace) -> str:
    """Short text of a configuration, e.g. ``L2 d64 E8k2 f32 s1 m2 | int8 p0.3 r0.5``
    (see :data:`CONFIG_LEGEND`)."""
    c = space.candidate(params)
    m, z = c.model, c.compression
    weights = "fp32" if z.bits == 32 else f"int{z.bits}"
    return (
        f"L{m.n_layer} d{m.d_model} E{m.moe.num_experts}k{m.moe.top_k} f{m.ffn_dim} s{m.moe.shared_experts} "
        f"m{m.moe_every} | {weights} p{z.sparsity:g} r{z.low_rank_ratio:g}"
    )


def front_table(front: list[FrozenTrial], space: SearchSpace, title: str = "Pareto front") -> Table:
    """One row per front trial, sorted by held-out loss: objectives and the configuration."""
    table = Table(title=title, caption=CONFIG_LEGEND)
    for column in ("#", "loss", "ms", "KB"):
        table.add_column(column, justify="right")
    table.add_column("config", no_wrap=True)
    for t in sorted(front, key=lambda t: t.values[0]):
        table.add_row(
            str(t.number),
            f"{t.values[0]:.3f}",
            f"{t.values[1]:.2f}",
            f"{t.values[2] / 1024:.0f}",
            describe(t.params, space),
        )
    return table


def choose(
    front: list[FrozenTrial], max_latency_ms: float | None = None, max_bytes: float | None = None
) -> FrozenTrial:
    """The front trial closest to the ideal point (each objective min-max normalized over the
    front) among those within the latency and size limits."""
    if not front:
        raise ValueError("the Pareto front is empty: no trial completed")
    allowed = [
        t
        for t in front
        if (max_latency_ms is None or t.values[1] <= max_latency_ms)
        and (max_bytes is None or t.values[2] <= max_bytes)
    ]
    if not allowed:
        raise ValueError(
            f"no front trial within max_latency_ms={max_latency_ms}, max_bytes={max_bytes}"
        )
    values = np.array([t.values for t in front])
    scaled = normalize([t.values for t in allowed], values.min(axis=0), values.max(axis=0))
    return allowed[int(np.linalg.norm(scaled, axis=1).argmin())]


def save_choice(
    path: str | os.PathLike[str],
    trial: FrozenTrial,
    space: SearchSpace,
    study: optuna.Study,
    task: str,
) -> dict:
    """Write the chosen trial's configuration and measurements as JSON (atomically); return it."""
    candidate = space.candidate(trial.params)
    record = {
        "format": CHOICE_FORMAT,
        "task": task,
        "study": study.study_name,
        "trial": trial.number,
        **candidate.as_dict(),
        "objectives": dict(zip(OBJECTIVES, trial.values)),
        "metrics": {k: v for k, v in trial.user_attrs.items() if k.startswith("final_")},
    }
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def _read_choice(path: str | os.PathLike[str]) -> dict:
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(record, dict) or record.get("format") != CHOICE_FORMAT:
        raise ValueError(f"{path}: not a pimoe search choice (format {CHOICE_FORMAT!r} expected)")
    return record


def load_config(path: str | os.PathLike[str]) -> LMConfig:
    """The model configuration saved by :func:`save_choice` (``pimoe search --config-out``)."""
    record = _read_choice(path)
    try:
        config = LMConfig.from_dict(record["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid model configuration ({err})") from err
    if config.parameter_bound() > MAX_CHOICE_PARAMETERS:
        raise ValueError(
            f"{path}: the model configuration describes up to {config.parameter_bound():,} "
            f"parameters, more than the {MAX_CHOICE_PARAMETERS:,} a search choice may hold"
        )
    return config


def load_compression(path: str | os.PathLike[str]) -> Compression:
    """The compression choice saved by :func:`save_choice`."""
    record = _read_choice(path)
    try:
        return Compression(**record["compression"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid compression choice ({err})") from err


def to_architecture_config(compression: Compression) -> ArchitectureConfig:
    """The :class:`~pimoe.compress.ArchitectureConfig` applying the same steps as
    :func:`pimoe.search.objective.compress_model` (low rank, magnitude pruning, dynamic int8 or
    int4 weight-only quantization; no distillation)."""
    return ArchitectureConfig(
        compression_ratio=compression.low_rank_ratio,
        enable_low_rank=compression.low_rank_ratio < 1.0,
        sparsity_ratio=compression.sparsity,
        enable_pruning=compression.sparsity > 0.0,
        quantization_bits=compression.bits,
        enable_quantization=compression.bits < 32,
        quantization_mode="dynamic",
    )


def save_compress_config(path: str | os.PathLike[str], compression: Compression) -> bool:
    """Write :func:`to_architecture_config` of ``compression`` as the JSON config file that
    ``pimoe compress MODEL OUT --config PATH`` reads; return False (and write nothing) when the
    choice compresses nothing (float32, no pruning, no low rank)."""
    from pimoe.compress.saved import config_to_dict

    config = to_architecture_config(compression)
    if not config.enabled_steps():
        return False
    atomic_write_text(path, json.dumps(config_to_dict(config), indent=2))
    return True


def plot_front(
    studies: dict[str, list[FrozenTrial]], path: str | os.PathLike[str], title: str
) -> None:
    """PNG scatter of held-out loss vs latency (log scale) of every completed trial, colour =
    bytes (log scale); each study's Pareto front (over all three objectives) is outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from pimoe.search.hypervolume import pareto_mask

    everything = [t.values for trials in studies.values() for t in trials]
    if not everything:
        raise ValueError("nothing to plot: no completed trial")
    sizes = np.array(everything)[:, 2]
    norm = LogNorm(vmin=sizes.min(), vmax=max(sizes.max(), sizes.min() * 1.01))
    markers = iter(("o", "s", "^", "D"))
    fig, ax = plt.subplots(figsize=(7, 5))
    scatter = None
    for label, trials in studies.items():
        if not trials:
            continue
        values = np.array([t.values for t in trials])
        marker = next(markers)
        scatter = ax.scatter(
            values[:, 1],
            values[:, 0],
            c=values[:, 2],
            cmap="viridis",
            norm=norm,
            marker=marker,
            alpha=0.8,
            label=f"{label} ({len(trials)} trials)",
        )
        front = values[pareto_mask(values)]
        ax.scatter(
            front[:, 1],
            front[:, 0],
            facecolors="none",
            edgecolors="red",
            marker=marker,
            s=120,
            linewidths=1.5,
        )
    ax.set(
        xscale="log",
        xlabel="median CPU latency (ms, log)",
        ylabel="held-out loss (nats)",
        title=f"{title}\nred outline: Pareto front over loss, latency and bytes",
    )
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="state-dict bytes")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def trial_record(trial: FrozenTrial) -> dict:
    """JSON-ready summary of one finished trial."""
    return {
        "number": trial.number,
        "state": trial.state.name,
        "params": trial.params,
        "values": dict(zip(OBJECTIVES, trial.values)) if trial.values else None,
        **{k: v for k, v in trial.user_attrs.items()},
    }
