"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Small tensors on a shared machine: one intra-op thread per module (oversubscribed cores make each
    tiny op up to 100x slower); the previous thread count is restored after the module.
    Use with ``pytestmark = pytest.mark.usefixtures('one_thread')``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
