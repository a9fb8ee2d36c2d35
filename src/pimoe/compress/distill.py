"""Knowledge distillation: train a student to reproduce a frozen teacher's outputs.

The logit loss is Hinton et al.'s: ``KL(softmax(t / T) || softmax(s / T)) * T**2``, so gradients
keep the same scale when the temperature ``T`` changes. Regression-style outputs (embeddings) use
``loss="mse"`` or ``loss="cosine"`` instead. Hidden states can be matched too: forward hooks on
named (teacher module, student module) pairs add a mean-squared error weighted by
``hidden_mse_weight``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

Batch = Tensor | tuple[Any, ...] | list[Any]
LossKind = Literal["kl", "mse", "cosine"]


def default_output_fn(output: Any) -> Tensor:
    """Return ``output.logits`` when present, the first element of a tuple, or ``output`` itself."""
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(
            f"expected a tensor output (or .logits / a tuple), got {type(output).__name__}"
        )
    return output


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model(*batch)`` for a tuple or list batch, ``model(batch)`` otherwise."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def soft_loss(
    student: Tensor, teacher: Tensor, kind: LossKind = "kl", temperature: float = 2.0
) -> Tensor:
    """Distillation loss between student and teacher outputs of the same shape.

    ``"kl"``: ``KL(softmax(teacher / T) || softmax(student / T)) * T**2`` over the last dimension,
    averaged over all leading positions. ``"mse"``: mean squared error. ``"cosine"``: mean of
    ``1 - cos`` along the last dimension.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student output {tuple(student.shape)} != teacher output {tuple(teacher.shape)}"
        )
    student, teacher = student.float(), teacher.float()
    if kind == "kl":
        s = F.log_softmax(student.reshape(-1, student.shape[-1]) / temperature, dim=-1)
        t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
        return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"loss must be 'kl', 'mse' or 'cosine', got {kind!r}")


@dataclass
class DistillResult:
    """What :func:`distill` did.

    ``losses`` holds the training loss of every step; ``val_losses`` the validation loss of every
    evaluation (empty without ``val_data``); ``best_val_loss`` is the lowest of them (``None``
    without ``val_data``); ``steps`` is the number of optimizer steps run.
    """

    losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best_val_loss: float | None = None
    steps: int = 0
    stopped_early: bool = False


@contextmanager
def _capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the (first tensor) output of each named submodule while the context is open."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"no module named {missing} in {type(model).__name__}")
    store: dict[str, Tensor] = {}

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[name] = default_output_fn(output)

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _zero_masks(student: nn.Module) -> dict[str, Tensor]:
    """Boolean masks of the nonzero entries of the student's parameters that contain zeros."""
    return {
        name: param.detach() != 0
        for name, param in student.named_parameters()
        if param.requires_grad and bool((param.detach() == 0).any())
    }


class _Distiller:
    """Holds one distillation run's settings; :func:`distill` is its public face."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        kind: LossKind,
        temperature: float,
        alpha: float,
        hidden_pairs: Sequence[tuple[str, str]],
        hidden_mse_weight: float,
        output_fn: Callable[[Any], Tensor],
        with_labels: bool,
    ) -> None:
        self.teacher, self.student = teacher, student
        self.kind, self.temperature, self.alpha = kind, temperature, alpha
        self.hidden_pairs, self.hidden_mse_weight = list(hidden_pairs), hidden_mse_weight
        self.output_fn, self.with_labels = output_fn, with_labels

    def loss(self, batch: Batch) -> Tensor:
        """Weighted distillation (+ hard-label, + hidden-state) loss of the student on ``batch``."""
        labels = None
        if self.with_labels:
            batch, labels = batch[0], batch[1]
        t_names = [t for t, _ in self.hidden_pairs]
        s_names = [s for _, s in self.hidden_pairs]
        with torch.no_grad(), _capture(self.teacher, t_names) as t_hidden:
            t_out = self.output_fn(call_model(self.teacher, batch))
        with _capture(self.student, s_names) as s_hidden:
            s_out = self.output_fn(call_model(self.student, batch))
        loss = self.alpha * soft_loss(s_out, t_out, self.kind, self.temperature)
        if labels is not None and self.alpha < 1.0:
            hard = F.cross_entropy(s_out.reshape(-1, s_out.shape[-1]).float(), labels.reshape(-1))
            loss = loss + (1.0 - self.alpha) * hard
        for t_name, s_name in self.hidden_pairs:
            loss = loss + self.hidden_mse_weight * F.mse_loss(
                s_hidden[s_name].float(), t_hidden[t_name].float()
            )
        return loss

    @torch.no_grad()
    def evaluate(self, data: Iterable[Batch]) -> float:
        """Mean loss over ``data`` with the student in eval mode."""
        self.student.eval()
        values = [float(self.loss(batch)) for batch in data]
        self.student.train()
        if not values:
            raise ValueError("val_data is empty")
        return sum(values) / len(values)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: Iterable[Batch],
    *,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 1e-3,
    temperature: float = 2.0,
    alpha: float = 1.0,
    loss: LossKind = "kl",
    hidden_pairs: Sequence[tuple[str, str]] = (),
    hidden_mse_weight: float = 0.0,
    output_fn: Callable[[Any], Tensor] = default_output_fn,
    with_labels: bool = False,
    val_data: Iterable[Batch] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = True,
    preserve_sparsity: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = False,
) -> DistillResult:
    """Train ``student`` in place to match the frozen ``teacher`` on ``data``.

    Args:
        data: re-iterable batches (a list or a ``DataLoader``). A batch is a tensor (called as
            ``model(batch)``) or a tuple/list (``model(*batch)``); with ``with_labels`` a batch is
            ``(inputs, labels)`` and ``labels`` feed a cross-entropy term weighted ``1 - alpha``.
        epochs, steps: passes over ``data``; ``steps`` (if given) stops after that many steps.
        lr: learning rate of the default AdamW optimizer (ignored when ``optimizer`` is given).
        temperature, alpha, loss: the soft loss (see :func:`soft_loss`) is weighted by ``alpha``.
        hidden_pairs, hidden_mse_weight: ``(teacher module name, student module name)`` pairs
            whose outputs must have equal shapes; their MSE is added with this weight.
        output_fn: turns a model's output into the tensor compared (default
            :func:`default_output_fn`).
        val_data, eval_every, patience, min_delta: the validation loss is computed every
            ``eval_every`` steps (default: at the end of each epoch); after ``patience``
            evaluations without an improvement larger than ``min_delta`` training stops.
        restore_best: with ``val_data``, load the student's weights of the best evaluation.
        preserve_sparsity: keep parameters' exact zeros at zero (a pruned student stays pruned).
        progress: show a tqdm progress bar.

    The teacher is put in eval mode and gets no gradients; the student's training flag is
    restored at the end.

    Raises:
        ValueError: a setting out of range, or output / hidden shapes that differ.
    """
    if (
        epochs < 1
        or (steps is not None and steps < 1)
        or temperature <= 0
        or not 0.0 <= alpha <= 1.0
    ):
        raise ValueError("need epochs >= 1, steps >= 1, temperature > 0 and 0 <= alpha <= 1")
    if patience is not None and (patience < 1 or val_data is None):
        raise ValueError("patience needs val_data and must be >= 1")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if loss not in ("kl", "mse", "cosine"):
        raise ValueError(f"loss must be 'kl', 'mse' or 'cosine', got {loss!r}")
    run = _Distiller(
        teacher,
        student,
        kind=loss,
        temperature=temperature,
        alpha=alpha,
        hidden_pairs=hidden_pairs,
        hidden_mse_weight=hidden_mse_weight,
        output_fn=output_fn,
        with_labels=with_labels,
    )
    was_training = student.training
    teacher.eval()
    student.train()
    opt = optimizer or torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=lr
    )
    masks = _zero_masks(student) if preserve_sparsity else {}
    params = dict(student.named_parameters())
    result = DistillResult()
    best_state: dict[str, Tensor] | None = None
    bad_evals = 0

    def check() -> bool:
        """Evaluate; return True when early stopping should end training."""
        nonlocal best_state, bad_evals
        assert val_data is not None  # only called with validation data
        value = run.evaluate(val_data)
        result.val_losses.append(value)
        if result.best_val_loss is None or value < result.best_val_loss - min_delta:
            result.best_val_loss, bad_evals = value, 0
            if restore_best:
                best_state = copy.deepcopy(student.state_dict())
        else:
            result.best_val_loss = min(result.best_val_loss, value)
            bad_evals += 1
        return patience is not None and bad_evals >= patience

    total = (
        steps if steps is not None else (epochs * len(data) if isinstance(data, Sized) else None)
    )
    bar = tqdm(total=total, disable=not progress, desc="distill")
    try:
        for _epoch in range(epochs):
            for batch in data:
                opt.zero_grad(set_to_none=True)
                value = run.loss(batch)
                value.backward()  # type: ignore[no-untyped-call]
                opt.step()
                with torch.no_grad():
                    for name, mask in masks.items():
                        params[name].mul_(mask)
                loss_value = value.item()
                result.losses.append(loss_value)
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4g}")
                if (
                    val_data is not None
                    and eval_every is not None
                    and result.steps % eval_every == 0
                ):
                    result.stopped_early = check()
                if result.stopped_early or (steps is not None and result.steps >= steps):
                    break
            else:
                if val_data is not None and eval_every is None:
                    result.stopped_early = check()
                if not result.stopped_early:
                    continue
            break
    finally:
        bar.close()
    if best_state is not None:
        student.load_state_dict(best_state)
    student.train(was_training)
    return result
