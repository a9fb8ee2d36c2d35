"""Effect of the router losses on the demo LM: held-out CE with aux / z-loss on and off.

Same model, data, steps (600), batch, learning rate and seed as `pimoe demo`; the dense twin is
the peer. Usage: python benchmarks/lm_router_losses.py  (about 12 minutes on 2 CPU cores)
"""

import math

import torch
from rich.console import Console
from rich.table import Table

from pimoe.data import byte_splits, load_pydoc_text
from pimoe.demo import train_lm
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig

SETTINGS = {
    "steps": 600,
    "batch_size": 16,
    "lr": 2e-3,
    "device": "cpu",
    "seed": 0,
    "progress": True,
}
RUNS = {
    "dense twin": LMConfig().dense_twin(),
    "MoE, no router losses": LMConfig(moe=MoEConfig(aux_loss_coef=0.0, z_loss_coef=0.0)),
    "MoE, aux 0.01 (default)": LMConfig(moe=MoEConfig(aux_loss_coef=0.01, z_loss_coef=0.0)),
    "MoE, z 0.001": LMConfig(moe=MoEConfig(aux_loss_coef=0.0, z_loss_coef=0.001)),
    "MoE, aux 0.01 + z 0.001": LMConfig(moe=MoEConfig(aux_loss_coef=0.01, z_loss_coef=0.001)),
}

if __name__ == "__main__":
    torch.set_num_threads(2)
    train, val = byte_splits(load_pydoc_text())
    table = Table(title="Demo LM, 600 steps: held-out cross-entropy (lower is better)")
    for column in ("run", "val CE (nats)", "bits/byte", "vs dense", "imbalance (mean of layers)"):
        table.add_column(column, justify="right")
    dense_loss = None
    for name, config in RUNS.items():
        result = train_lm(config, train, val, **SETTINGS)
        dense_loss = dense_loss or result.val_loss
        imbalance = (
            sum(s.imbalance for s in result.routing) / len(result.routing)
            if result.routing
            else float("nan")
        )
        table.add_row(
            name,
            f"{result.val_loss:.4f}",
            f"{result.val_loss / math.log(2):.4f}",
            f"{result.val_loss / dense_loss:.3f}",
            f"{imbalance:.2f}",
        )
    Console().print(table)
