"""Small networks for few-shot learning on 8x8 images (sklearn digits): a 3-block convnet, usable
as a ProtoNet embedding or, with a linear head, as a MAML classifier.

Normalization matters for MAML: ``"batch"`` keeps running statistics, which the functional inner
loop (``torch.func.functional_call`` under ``vmap``) must not update, so MAML uses ``"none"`` or
``"batch_transductive"`` (batch statistics of the current support or query set, no running
statistics: the original MAML's choice).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

Norm = Literal["batch", "batch_transductive", "none"]


class ConvNet(nn.Module):
    """``x [M, side * side]`` -> ``[M, width * (side // 4) ** 2]`` (embedding) or ``[M, num_classes]``.

    Three blocks of 3x3 conv (``width`` channels), optional batch norm, ReLU; 2x2 max-pool after
    blocks 2 and 3.

    Args:
        width: channels of every conv.
        side: height = width of the square single-channel input (flattened row-major).
        norm: ``"batch"`` (with running statistics), ``"batch_transductive"`` (always batch
            statistics) or ``"none"``.
        num_classes: if given, a linear head to that many logits.
    """

    def __init__(
        self, width: int = 32, side: int = 8, norm: Norm = "batch", num_classes: int | None = None
    ) -> None:
        super().__init__()
        if width < 1 or side < 4 or side % 4:
            raise ValueError(
                f"need width >= 1 and side a multiple of 4, got width={width}, side={side}"
            )
        if norm not in ("batch", "batch_transductive", "none"):
            raise ValueError(
                f"unknown norm {norm!r}; expected 'batch', 'batch_transductive' or 'none'"
            )
        self.side = side
        blocks: list[nn.Module] = []
        for i in range(3):
            blocks.append(nn.Conv2d(1 if i == 0 else width, width, 3, padding=1))
            if norm != "none":
                blocks.append(nn.BatchNorm2d(width, track_running_stats=norm == "batch"))
            blocks.append(nn.ReLU())
            if i:
                blocks.append(nn.MaxPool2d(2))
        blocks.append(nn.Flatten())
        self.out_dim = width * (side // 4) ** 2
        if num_classes is not None:
            blocks.append(nn.Linear(self.out_dim, num_classes))
            self.out_dim = num_classes
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """``x [M, side * side]`` -> ``[M, out_dim]``."""
        if x.shape[-1] != self.side * self.side:
            raise ValueError(f"expected inputs [M, {self.side * self.side}], got {tuple(x.shape)}")
        return self.net(x.reshape(-1, 1, self.side, self.side))
