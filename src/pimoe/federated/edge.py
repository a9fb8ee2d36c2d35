"""``EdgeComputing(config).process(x)`` (a compatibility name), made real: the model behind
``process`` is trained by federated learning over simulated edge nodes (Flower clients holding
digits shards)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pimoe.federated.config import FederatedConfig
from pimoe.federated.task import load_task


class EdgeComputing:
    """``EdgeComputing(config).process(x)``: logits ``[B, 10]`` of the federated model for digits ``x [B, 64]``.

    ``config`` is a :class:`FederatedConfig` (None: the 100-client non-IID defaults). The first
    :meth:`process` (or :meth:`train`) runs the federated training on ``backend``; ``record`` then
    holds its accuracy and participation per round. Pixel values are expected in [0, 1]
    (sklearn's 0..16 divided by 16).
    """

    def __init__(self, config: FederatedConfig | None = None, backend: str = "inprocess") -> None:
        self.config = config if config is not None else FederatedConfig()
        if self.config.task != "digits":
            raise ValueError(f"EdgeComputing serves the digits task, got task {self.config.task!r}")
        self.backend = backend
        self.model: torch.nn.Module | None = None
        self.record: Any = None

    def train(self) -> EdgeComputing:
        """Run the federated training (once) and keep the final global model."""
        from pimoe.federated.simulation import run_federated

        if self.model is None:
            with (
                torch.enable_grad()
            ):  # process() runs under no_grad; local training needs gradients
                self.record = run_federated(self.config, backend=self.backend)
            model = load_task(self.config).make_model(self.config.seed)
            model.load_state_dict(self.record.arrays.to_torch_state_dict())
            self.model = model.eval()
        return self

    @torch.no_grad()
    def process(self, x: Tensor) -> Tensor:
        """``x [B, 64]`` float → logits ``[B, 10]`` of the federated global model."""
        if (
            not isinstance(x, Tensor)
            or x.ndim != 2
            or x.shape[1] != 64
            or not x.is_floating_point()
        ):
            got = (
                f"{x.dtype} tensor of shape {tuple(x.shape)}"
                if isinstance(x, Tensor)
                else type(x).__name__
            )
            raise ValueError(
                f"process expects a float tensor [B, 64] of 8x8 digit pixels in [0, 1], got {got}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("process input holds NaN or inf")
        model = self.train().model
        assert model is not None
        return model(x)
