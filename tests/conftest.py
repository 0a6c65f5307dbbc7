"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """The test models are tiny: on a loaded 2-core machine, 2 intra-op threads made the mods and
    graph tests take 72 s instead of 14 s (OpenMP threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
