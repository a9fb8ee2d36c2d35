"""Training of the text expert (a byte-level :class:`PiMoELM`) on the arithmetic task.

The text expert learns the whole task text, computation spans included: prompt, ``CALL_START``,
the expression (its text-to-computation work), ``=``, the result digits, ``CALL_END``. The same
trained model serves the three pipelines of the comparison (LM alone, PiMoE hand-off, tool call),
so they differ only in who writes the result bytes at inference.

Batches are fresh problems of the ``"train"`` split in index order (problem ``i`` of step ``s``
is ``s * batch_size + i``): the data never repeats and is the same for every run with a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from pimoe.compute.task import ArithmeticTask, lm_batch
from pimoe.moe.model import LMConfig, PiMoELM
from pimoe.training import run_steps


@dataclass
class TrainSettings:
    """Optimizer and data budget of one training run (text expert or router)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 3 or self.batch_size < 1:  # the schedule warms up over >= 2 steps
            raise ValueError(
                f"need steps >= 3 and batch_size >= 1, got {self.steps}, {self.batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def progress_bar(enabled: bool) -> Progress:
    """The rich progress bar of the router training loop (:mod:`pimoe.compute.handoff`; transient)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def make_optimizer(
    params: list[torch.nn.Parameter], settings: TrainSettings
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a one-cycle schedule: warm-up over 10% of the steps (at least 2), cosine decay."""
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=settings.lr,
        total_steps=settings.steps,
        pct_start=max(0.1, 2 / settings.steps),
    )
    return optimizer, schedule


def train_text_expert(
    task: ArithmeticTask, config: LMConfig, settings: TrainSettings, progress: bool = True
) -> tuple[PiMoELM, list[float]]:
    """Train a :class:`PiMoELM` on ``task``'s train split; returns the model (in eval mode) and
    the per-step loss (next-byte cross-entropy plus the MoE auxiliary losses)."""
    torch.manual_seed(settings.seed)
    model = PiMoELM(config)
    optimizer, schedule = make_optimizer(list(model.parameters()), settings)

    def step(i: int) -> dict[str, float]:
        first = i * settings.batch_size
        problems = [task.problem("train", first + j) for j in range(settings.batch_size)]
        idx, targets = lm_batch(problems)  # [B, S] each
        if idx.shape[1] > config.block_size:
            raise ValueError(
                f"problems of {idx.shape[1] + 1} bytes exceed block_size={config.block_size}"
            )
        out = model(idx, targets)
        assert out.loss is not None
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        return {"loss": out.loss.item()}

    model.train()
    history = run_steps(step, settings.steps, "train text expert", progress)
    model.eval()
    return model, history["loss"]
