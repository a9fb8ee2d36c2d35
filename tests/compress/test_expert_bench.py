"""The expert drop/merge benchmark's pieces on real data (sklearn digits), at a small size."""

import torch

from pimoe.bench.compress_experts import ExpertBenchConfig, accuracy, digits_split, train, variants


def test_distillation_repairs_a_model_with_half_its_experts() -> None:
    torch.set_num_threads(1)
    cfg = ExpertBenchConfig(seeds=[0], epochs=12, distill_epochs=4)
    x_tr, y_tr, x_te, y_te = digits_split(0)
    assert x_tr.shape == (1437, 64) and x_te.shape == (360, 64) and float(x_tr.max()) <= 1.0
    model = train(x_tr, y_tr, cfg, seed=0)
    built = variants(model, x_tr, cfg)
    acc = {name: accuracy(m, x_te, y_te) for name, m in built.items()}
    assert acc["8 experts (trained)"] > 0.93
    repaired = built["drop 4 (weight norm) + distill"]
    assert repaired.moe.num_experts == 4 and model.moe.num_experts == 8
    assert acc["drop 4 (weight norm) + distill"] > acc["8 experts (trained)"] - 0.04
