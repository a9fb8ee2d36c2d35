from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Decoding runs thousands of tiny ops: with several threads on a busy machine each op pays
    a thread barrier (measured 50x slower at 2 threads under load), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
