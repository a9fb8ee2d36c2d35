import pytest
import torch

from pimoe.search.objective import TrialSettings
from pimoe.search.space import SearchSpace
from pimoe.search.tasks import DigitsTask

# Two-choice tiny space: every trial trains in well under a second.
TINY = dict(
    n_layer=(1,),
    d_model=(16, 32),
    num_experts=(2, 4),
    top_k=(1, 2),
    ffn_dim=(16,),
    shared_experts=(0, 1),
    moe_every=(1,),
    bits=(32, 8),
    sparsity=(0.0, 0.3),
    low_rank_ratio=(1.0,),
)


@pytest.fixture(scope="session")
def digits() -> DigitsTask:
    return DigitsTask(batch_size=32)


@pytest.fixture
def tiny_space() -> SearchSpace:
    return SearchSpace(**TINY)


@pytest.fixture
def fast() -> TrialSettings:
    return TrialSettings(steps=6, checkpoints=2, latency_repeats=2)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
