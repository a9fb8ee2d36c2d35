"""A small byte-level :class:`PiMoELM` to serve (``pimoe save-demo-model PATH``).

The model is trained for a few dozen AdamW steps on Python's bundled ``pydoc_data`` text with
:func:`pimoe.demo.train_lm`: enough for it to prefer text-like bytes, far from a useful language
model (``steps=0`` saves it untrained). Serving cost does not depend on the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pimoe.data import byte_splits, load_pydoc_text
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM
from pimoe.training import evaluate, train_lm

DEMO_MODEL_CONFIG = LMConfig(
    block_size=64,
    n_layer=2,
    n_head=4,
    d_model=64,
    moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=64),
)


def save_demo_model(
    path: str | os.PathLike[str],
    steps: int = 40,
    seed: int = 0,
    config: LMConfig = DEMO_MODEL_CONFIG,
) -> dict[str, float]:
    """Train ``config`` for ``steps`` steps (0: none) on pydoc text, save it with
    :meth:`PiMoELM.save` at ``path``; return ``{"params", "val_loss"}``."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    train, val = byte_splits(load_pydoc_text())
    if steps:
        model = train_lm(
            config,
            train,
            val,
            steps=steps,
            batch_size=16,
            lr=2e-3,
            device="cpu",
            seed=seed,
            progress=False,
        ).model
    else:
        torch.manual_seed(seed)
        model = PiMoELM(config)
    val_loss = evaluate(model, val, 16, seed + 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return {"params": float(model.num_params()), "val_loss": val_loss}


__all__ = ["DEMO_MODEL_CONFIG", "save_demo_model"]
