"""Training loops: one step runner with progress, and the byte-level :class:`PiMoELM` trainer.

``run_steps(step, steps, desc)`` calls ``step(i)`` for each step, keeps the numbers it returns and
shows them in a progress display (:class:`pimoe.models.progress.Progress`: a bar on a terminal,
plain lines every 15 s in logs). ``train_lm`` trains a :class:`PiMoELM` with AdamW on random
windows of a byte stream, as ``pimoe demo --scratch`` and ``pimoe save-demo-model`` do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pimoe.data import get_batch
from pimoe.models.progress import Progress
from pimoe.moe.model import LMConfig, PiMoELM
from pimoe.moe.stats import RoutingStats

VAL_BATCHES = 20
"""Fixed held-out batches of :func:`evaluate`."""
STATS_STEPS = 20
""":func:`train_lm` sums routing statistics over this many final training steps."""


def run_steps(
    step: Callable[[int], Mapping[str, float]], steps: int, desc: str, progress: bool = True
) -> dict[str, list[float]]:
    """Call ``step(i)`` for ``i`` in ``range(steps)``; return each reported value's history.

    ``step`` returns the numbers of that step (e.g. ``{"loss": 2.3}``, Python floats: convert
    tensors with one ``.tolist()``, a single device sync); they are shown next to the count.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    history: dict[str, list[float]] = {}
    with Progress(steps, desc, enabled=progress) as bar:
        for i in range(steps):
            values = step(i)
            for name, value in values.items():
                history.setdefault(name, []).append(value)
            bar.update(**values)
    return history


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over the first 5% of steps, then cosine decay to
    10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * done))


@torch.no_grad()
def evaluate(model: PiMoELM, val: Tensor, batch_size: int, seed: int) -> float:
    """Mean cross-entropy (nats per token) of ``model`` on :data:`VAL_BATCHES` held-out windows of
    ``val`` (1-D token ids ``[N]``) fixed by ``seed``; leaves the model in eval mode."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(VAL_BATCHES):
        x, y = get_batch(val, batch_size, model.config.block_size, generator)
        out = model(x, y)
        assert out.ce_loss is not None
        losses.append(out.ce_loss.item())
    return sum(losses) / len(losses)


@dataclass
class TrainResult:
    """Per-step training curves, held-out CE, throughput and routing statistics of one run."""

    losses: list[float]  # total loss (CE + weighted aux and z losses) per step
    ce: list[float]  # cross-entropy per step
    aux: list[float]  # load-balancing loss per step, summed over MoE layers (0 for a dense model)
    val_loss: float  # mean CE over VAL_BATCHES fixed held-out batches (nats per byte)
    tokens_per_s: float  # training throughput (forward, backward and optimizer step)
    routing: list[RoutingStats]  # per MoE layer, summed over the last STATS_STEPS steps
    model: PiMoELM = field(repr=False)


def train_lm(
    config: LMConfig,
    train: Tensor,
    val: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    device: str | torch.device,
    seed: int,
    progress: bool = True,
) -> TrainResult:
    """Train a :class:`PiMoELM` with AdamW on random windows of ``train`` (1-D token ids ``[N]``),
    windows ``[batch_size, config.block_size]``; score it on ``val`` with :func:`evaluate`.

    ``seed`` fixes the initialization, the batch order and the held-out batches, so two configs
    trained with the same seed see exactly the same data.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    model = PiMoELM(config).to(device)
    train, val = train.to(device), val.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    generator = torch.Generator().manual_seed(seed)
    routing: list[RoutingStats] = []

    def step(i: int) -> dict[str, float]:
        nonlocal routing
        x, y = get_batch(train, batch_size, config.block_size, generator)
        out = model(x, y)
        assert out.loss is not None and out.ce_loss is not None
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if i >= steps - STATS_STEPS and model.moe_layers:
            latest = model.routing_stats()
            routing = latest if not routing else [a + b for a, b in zip(routing, latest)]
        # One device sync per step; it also makes the timing honest on GPUs.
        loss, ce, aux = torch.stack((out.loss, out.ce_loss, out.aux_loss)).detach().tolist()
        return {"loss": loss, "ce": ce, "aux": aux}

    name = "PiMoE" if model.moe_layers else "dense"
    model.train()
    start = time.perf_counter()
    history = run_steps(step, steps, f"train {name} LM", progress)
    seconds = time.perf_counter() - start
    val_loss = evaluate(model, val, batch_size, seed + 1)
    return TrainResult(
        losses=history["loss"],
        ce=history["ce"],
        aux=history["aux"],
        val_loss=val_loss,
        tokens_per_s=steps * batch_size * config.block_size / seconds,
        routing=routing,
        model=model,
    )


__all__ = [
    "STATS_STEPS",
    "VAL_BATCHES",
    "TrainResult",
    "evaluate",
    "lr_factor",
    "run_steps",
    "train_lm",
]
