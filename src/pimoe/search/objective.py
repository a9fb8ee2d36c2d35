"""One search trial: train a candidate, compress it, measure its three objectives.

Objectives (all minimized): held-out cross-entropy of the *compressed* model, its median CPU
latency on the task's latency batch, and the bytes of its ``torch.save``'d state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pimoe.compress.lowrank import factorize
from pimoe.compress.prune import magnitude_prune
from pimoe.compress.quantize import quantize_dynamic_int8, quantize_weight_only_int4, saved_bytes
from pimoe.compress.report import median_latency_ms
from pimoe.search.space import Candidate, Compression
from pimoe.search.tasks import Task
from pimoe.training import run_steps

OBJECTIVES = ("loss", "latency_ms", "bytes")


@dataclass(frozen=True)
class TrialSettings:
    """How each candidate is trained and measured.

    ``checkpoints`` held-out evaluations are spread evenly over the ``steps`` (the last one at
    the end); they form the learning curve used by pruning and by the predictor.
    """

    steps: int = 60
    lr: float = 1e-2
    checkpoints: int = 4
    latency_repeats: int = 15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 1 <= self.checkpoints <= self.steps:
            raise ValueError(
                f"checkpoints must be in [1, steps={self.steps}], got {self.checkpoints}"
            )
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.latency_repeats < 1:
            raise ValueError(f"latency_repeats must be >= 1, got {self.latency_repeats}")

    def checkpoint_steps(self) -> list[int]:
        """1-based step numbers after which the held-out loss is measured."""
        return sorted(
            {round(self.steps * (i + 1) / self.checkpoints) for i in range(self.checkpoints)}
        )


@dataclass
class TrialResult:
    """Measured outcome of one candidate."""

    loss: float  # held-out CE after compression
    latency_ms: float
    bytes: int
    curve: list[float]  # held-out CE (before compression) at each checkpoint
    params: int  # parameter count of the uncompressed model
    metrics: dict[str, float] = field(
        default_factory=dict
    )  # all held-out metrics after compression

    def values(self) -> tuple[float, float, float]:
        return self.loss, self.latency_ms, float(self.bytes)


CheckpointHook = Callable[[int, float, nn.Module], None]


def train(
    task: Task,
    candidate: Candidate,
    settings: TrialSettings,
    on_checkpoint: CheckpointHook | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train ``task.build(candidate.model)`` with AdamW (linear warm-up over 10% of the steps);
    return it and its held-out loss at each checkpoint. ``on_checkpoint(index, loss, model)`` may raise
    (e.g. ``optuna.TrialPruned``) to stop early. Seeded: same settings, same model."""
    torch.manual_seed(settings.seed)
    model = task.build(candidate.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    warmup = max(1, settings.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    generator = torch.Generator().manual_seed(settings.seed)
    checkpoints = settings.checkpoint_steps()
    curve: list[float] = []

    def one_step(index: int) -> dict[str, float]:
        step = index + 1
        model.train()
        loss = task.loss(model, *task.batch(generator))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step in checkpoints:
            curve.append(task.evaluate(model)["loss"])
            if on_checkpoint is not None:
                on_checkpoint(len(curve) - 1, curve[-1], model)
        return {}

    # the study shows progress per trial; one bar per trial's steps would only add noise
    run_steps(one_step, settings.steps, "trial", progress=False)
    return model, curve


def compress_model(model: nn.Module, compression: Compression) -> nn.Module:
    """Apply ``compression`` to a trained ``model`` (in place where possible): low-rank
    factorization to ``low_rank_ratio`` of each Linear's parameters, global magnitude pruning of
    ``sparsity`` of the Linear weights, then int8 dynamic (torch.ao) or int4 weight-only
    quantization. Only plain ``nn.Linear`` layers are touched (see docs/compress.md): the stacked
    expert weights of PiMoE layers, the router gates and the tied embedding stay in float32."""
    model.eval()
    if compression.low_rank_ratio < 1.0:
        factorize(model, ratio=compression.low_rank_ratio)
    if compression.sparsity > 0.0:
        magnitude_prune(model, compression.sparsity)
    if compression.bits == 8:
        model = quantize_dynamic_int8(model, inplace=True)
    elif compression.bits == 4:
        quantize_weight_only_int4(model)
    return model


def run_trial(
    task: Task,
    candidate: Candidate,
    settings: TrialSettings,
    on_checkpoint: CheckpointHook | None = None,
) -> TrialResult:
    """Train, compress and measure ``candidate`` on ``task``."""
    model, curve = train(task, candidate, settings, on_checkpoint)
    params = sum(p.numel() for p in model.parameters())
    model = compress_model(model, candidate.compression)
    metrics = task.evaluate(model)
    latency = median_latency_ms(model, task.latency_input(), repeats=settings.latency_repeats)
    return TrialResult(
        loss=metrics["loss"],
        latency_ms=latency,
        bytes=saved_bytes(model),
        curve=curve,
        params=params,
        metrics=metrics,
    )
