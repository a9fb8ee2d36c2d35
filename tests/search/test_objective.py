import copy

import pytest
import torch

from pimoe.compress.quantize import Int4WeightOnlyLinear, saved_bytes
from pimoe.moe.model import LMConfig
from pimoe.search.objective import TrialSettings, compress_model, run_trial, train
from pimoe.search.space import Compression, SearchSpace
from pimoe.search.tasks import DigitsMoEClassifier, LMTask, make_task

PARAMS = dict(
    n_layer=1,
    d_model=32,
    num_experts=2,
    top_k=1,
    ffn_dim=16,
    shared_experts=0,
    moe_every=1,
    bits=32,
    sparsity=0.0,
    low_rank_ratio=1.0,
)


def test_training_learns_digits_and_is_seeded(digits, tiny_space) -> None:
    candidate = tiny_space.candidate(PARAMS)
    settings = TrialSettings(steps=40, checkpoints=4, latency_repeats=2)
    model, curve = train(digits, candidate, settings)
    _again, curve_again = train(digits, candidate, settings)
    assert curve == curve_again  # same seed, same data, same model
    assert curve[-1] < curve[0] < 2.4  # chance is ln(10) = 2.30; it learns
    assert digits.evaluate(model)["accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_compression_shrinks_the_saved_model(digits, tiny_space) -> None:
    model, _ = train(digits, tiny_space.candidate(PARAMS), TrialSettings(steps=2, checkpoints=1))
    reference = digits.evaluate(model)
    full = saved_bytes(model)
    int8 = compress_model(copy.deepcopy(model), Compression(bits=8))
    assert saved_bytes(int8) < full
    int4 = compress_model(copy.deepcopy(model), Compression(bits=4))
    assert any(isinstance(m, Int4WeightOnlyLinear) for m in int4.modules())
    pruned = compress_model(copy.deepcopy(model), Compression(sparsity=0.5))
    weights = [m.weight for m in pruned.modules() if type(m) is torch.nn.Linear]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.01)
    same = compress_model(copy.deepcopy(model), Compression())
    assert digits.evaluate(same) == reference


def test_run_trial_measures_three_objectives(digits, tiny_space, fast) -> None:
    result = run_trial(digits, tiny_space.candidate({**PARAMS, "bits": 8}), fast)
    loss, latency, size = result.values()
    assert loss == result.metrics["loss"] > 0 and latency > 0 and size == result.bytes > 0
    assert len(result.curve) == fast.checkpoints and result.params > 0


def test_lm_task_and_settings_validation() -> None:
    task = LMTask(block_size=16, batch_size=2, val_batches=1)
    space = SearchSpace(d_model=(16,), base=LMConfig(block_size=16, n_head=4))
    _model, curve = train(
        task, space.candidate({**PARAMS, "d_model": 16}), TrialSettings(steps=2, checkpoints=1)
    )
    assert len(curve) == 1 and 4.0 < curve[0] < 6.0  # near ln(256) = 5.55 after two steps
    with pytest.raises(ValueError, match="block_size"):
        task.build(LMConfig(block_size=32))
    with pytest.raises(ValueError, match="unknown task"):
        make_task("imagenet")
    with pytest.raises(ValueError, match="shape"):
        DigitsMoEClassifier(LMConfig(d_model=16, n_head=4))(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="checkpoints"):
        TrialSettings(steps=3, checkpoints=4)
    with pytest.raises(ValueError, match="steps"):
        TrialSettings(steps=0)
    assert TrialSettings(steps=10, checkpoints=3).checkpoint_steps() == [3, 7, 10]
