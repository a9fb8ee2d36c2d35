"""The two tasks a search runs on: byte-level LM on pydoc text and sklearn digits classification.

A :class:`Task` builds a model from an :class:`~pimoe.moe.model.LMConfig`, serves seeded
training batches, scores a model on fixed held-out data and gives the batch its latency is timed
on. Quality is the held-out cross-entropy in both tasks (lower is better); digits also report
accuracy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.data import byte_splits, get_batch, load_pydoc_text
from pimoe.moe.layer import PiMoE
from pimoe.moe.model import Block, LMConfig, PiMoELM


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the load-balancing losses of the last forward of every PiMoE layer in ``model``."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, PiMoE)]
    return torch.stack(losses).sum() if losses else torch.zeros(())


class Task(ABC):
    """What a search trial needs from a task; quality = held-out cross-entropy (nats)."""

    name: str

    @abstractmethod
    def build(self, config: LMConfig) -> nn.Module:
        """A freshly initialized model for ``config``."""

    @abstractmethod
    def batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One training batch ``(inputs, targets)`` drawn with ``generator``."""

    @abstractmethod
    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """Training loss: cross-entropy plus ``aux_loss_coef`` times the load-balancing loss."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; ``"loss"`` (mean cross-entropy) is always present."""

    @abstractmethod
    def latency_input(self) -> Tensor:
        """The fixed batch whose eval-mode forward time is the latency objective."""


class LMTask(Task):
    """Next-byte prediction on ``pydoc_data.topics`` (the demo's data); windows of ``block_size``.

    Held-out loss: mean CE over ``val_batches`` fixed windows of the last 10% of the text.
    Latency input: one ``[1, block_size]`` window (a single request).
    """

    name = "lm"

    def __init__(
        self, block_size: int = 64, batch_size: int = 16, val_batches: int = 4, seed: int = 0
    ) -> None:
        self.block_size, self.batch_size = block_size, batch_size
        self.train, val = byte_splits(load_pydoc_text())
        generator = torch.Generator().manual_seed(seed + 1)
        self.val = [get_batch(val, batch_size, block_size, generator) for _ in range(val_batches)]

    def build(self, config: LMConfig) -> nn.Module:
        if config.block_size != self.block_size or config.vocab_size != 256:
            raise ValueError(
                f"the LM task needs vocab_size=256 and block_size={self.block_size}, got "
                f"{config.vocab_size} and {config.block_size}"
            )
        return PiMoELM(config)

    def batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return get_batch(self.train, self.batch_size, self.block_size, generator)

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        out = model(inputs, targets)
        return out.loss

    @torch.inference_mode()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        losses = [float(model(x, y).ce_loss) for x, y in self.val]
        return {"loss": sum(losses) / len(losses)}

    def latency_input(self) -> Tensor:
        return self.val[0][0][:1]


class DigitsMoEClassifier(nn.Module):
    """PiMoE transformer over the 8 rows of an 8x8 digit image.

    ``x [B, 64]`` (pixels in [0, 1]) -> 8 row tokens ``[B, 8, 8]`` -> Linear to ``[B, 8, D]`` plus
    learned positions -> ``config.n_layer`` :class:`~pimoe.moe.model.Block` s (PiMoE FFN in every
    ``moe_every``-th) -> RMSNorm, mean over rows -> ``logits [B, 10]``.
    """

    def __init__(self, config: LMConfig, num_classes: int = 10) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(8, config.d_model)
        self.pos = nn.Parameter(torch.randn(8, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(config, config.is_moe(i)) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # [B, 64] -> [B, 10]
        if x.dim() != 2 or x.shape[1] != 64:
            raise ValueError(f"x must have shape [B, 64], got {tuple(x.shape)}")
        h = self.embed(x.view(-1, 8, 8)) + self.pos  # [B, 8, D]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class DigitsTask(Task):
    """sklearn's 8x8 digits (1,797 images), a stratified 75/25 split fixed by ``seed``.

    Latency input: a batch of ``latency_batch`` held-out images.
    """

    name = "digits"

    def __init__(self, batch_size: int = 64, seed: int = 0, latency_batch: int = 32) -> None:
        from pimoe.data.digits import digits_split

        train, val = digits_split(test_size=0.25, seed=seed)
        self.x_train, self.y_train, self.x_val, self.y_val = train.x, train.y, val.x, val.y
        self.batch_size, self.latency_batch = batch_size, latency_batch

    def build(self, config: LMConfig) -> nn.Module:
        return DigitsMoEClassifier(config)

    def batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(len(self.x_train), (self.batch_size,), generator=generator)
        return self.x_train[index], self.y_train[index]

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        ce = F.cross_entropy(model(inputs), targets)
        return ce + cast(Any, model).config.moe.aux_loss_coef * moe_aux_loss(model)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = model(self.x_val)
        return {
            "loss": float(F.cross_entropy(logits, self.y_val)),
            "accuracy": float((logits.argmax(-1) == self.y_val).float().mean()),
        }

    def latency_input(self) -> Tensor:
        return self.x_val[: self.latency_batch]


TASKS: dict[str, Callable[..., Task]] = {"lm": LMTask, "digits": DigitsTask}


def make_task(name: str, seed: int = 0) -> Task:
    """The task called ``name`` (``"lm"`` or ``"digits"``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](seed=seed)
