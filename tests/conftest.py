import gc
from collections.abc import Iterator

import pytest
import torch

from pimoe.moe import threaded


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def threaded_kernel_built() -> None:
    """The threaded experts kernel, built (skipped where no C++ compiler can build it).
    Session-scoped, so hypothesis tests can use it too."""
    if threaded.threaded_kernel() is None:
        pytest.skip("no C++ compiler: the threaded kernel cannot be built here")


@pytest.fixture
def two_threads(threaded_kernel_built: None) -> Iterator[None]:
    """Torch on 2 threads with the threaded experts kernel built and its buffer pool empty.
    Garbage of earlier tests is collected first, so that no tensor of theirs returns a block to
    the pool during the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    gc.collect()
    threaded.empty_cache()
    yield
    threaded.empty_cache()
    torch.set_num_threads(before)


@pytest.fixture
def mkl_forward() -> Iterator[None]:
    """The threaded kernel's forward matmuls on at::mm (MKL), whose results are the per-expert
    loop's bit for bit (the default, oneDNN, agrees to float rounding)."""
    before = threaded.expert_matmul()
    threaded.set_expert_matmul("mkl")
    yield
    threaded.set_expert_matmul(before)
