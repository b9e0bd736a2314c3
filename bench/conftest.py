"""The benchmark smoke suite checks arithmetic, not speed: one torch thread, so that
tiny ops never wait on a thread descheduled by a busy shared machine."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
