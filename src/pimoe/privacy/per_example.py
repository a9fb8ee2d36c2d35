"""Per-example gradients for models Opacus's layer hooks cannot handle (PiMoE layers), one example at a time.

Opacus computes per-sample gradients layer by layer: a hook sees a layer's input and output
gradient and assumes row ``i`` of both belongs to example ``i``. Inside a PiMoE layer the experts
see the routed rows sorted by expert (``x_sorted [N, D]`` with ``N = T * k``, plus ``counts
[E]``), so that assumption breaks: Opacus's generic (functorch) path fails on their signature,
and a per-row gradient would be charged to the wrong example. :class:`PerExampleModule` takes the
other route DP-SGD allows: it runs the model on each example of the batch separately (a batch of
one: routing cannot mix examples), keeps each example's graph, and when the loss is
back-propagated it differentiates each example's output on its own. The result is the exact
per-example gradient ``[B, *p.shape]`` of every trainable parameter, stored in ``p.grad_sample``
where Opacus's ``DPOptimizer`` reads it to clip, noise and account. Cost: ``B`` small forward and
backward passes instead of one batched pass.

Requirements: the loss is a mean over examples of a per-example term (cross-entropy, MSE), as
with Opacus's ``loss_reduction="mean"``; the model has no layer that mixes examples in training
(BatchNorm: run :func:`pimoe.privacy.dp.dp_compatible` first).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class PerExampleModule(nn.Module):
    """``PerExampleModule(model)(x [B, ...]) -> model's output [B, ...]``, with ``p.grad_sample``
    (``[B, *p.shape]``) of every trainable parameter filled by ``loss.backward()``.

    In eval mode or without grad it is ``model(x)``. ``_module`` is the wrapped model (the name
    Opacus's ``GradSampleModule`` uses).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._module = model

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(x)
        params = [p for _, p in self.trainable()]
        if (
            len(x) == 0
        ):  # an empty Poisson batch: zero per-example gradients, a noised step still follows
            for p in params:
                p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
            with torch.no_grad():
                return self._module(x).requires_grad_()
        outputs = [self._module(x[i : i + 1]) for i in range(len(x))]  # [1, ...] each, own graph
        out = torch.cat([o.detach() for o in outputs]).requires_grad_()  # the loss is taken on this

        def per_example(grad_out: Tensor) -> None:
            grads = []
            scale = float(len(x))  # d(mean loss)/d(out_i) = (1/B) d(loss_i)/d(out_i)
            for i, o in enumerate(outputs):
                g = torch.autograd.grad(o, params, grad_out[i : i + 1] * scale, allow_unused=True)
                grads.append(
                    [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
                )
            for j, p in enumerate(params):
                p.grad_sample = torch.stack([g[j] for g in grads])  # type: ignore[attr-defined]

        out.register_hook(per_example)
        return out


def make_private_per_example(
    engine: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader]:
    """What ``engine.make_private`` does (Opacus 1.5+), with :class:`PerExampleModule` in place of
    Opacus's hook-based ``GradSampleModule``: Poisson loader, ``DPOptimizer`` (clip per example,
    Gaussian noise, mean over the expected batch size) and ``engine.accountant`` counting each step.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    if {id(p) for g in optimizer.param_groups for p in g["params"]} - {
        id(p) for p in model.parameters()
    }:
        raise ValueError("the optimizer holds parameters that are not the model's")
    if poisson_sampling:
        data_loader = DPDataLoader.from_data_loader(data_loader)
    sample_rate = 1 / len(data_loader)
    expected_batch_size = int(len(data_loader.dataset) * sample_rate)  # type: ignore[arg-type]
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PerExampleModule(model), dp_optimizer, data_loader
