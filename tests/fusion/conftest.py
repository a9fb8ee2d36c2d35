import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The tests use tiny models; one thread avoids oversubscription on shared CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
