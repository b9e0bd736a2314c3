"""Test setup: Triton runs through its interpreter when there is no GPU.

TRITON_INTERPRET must be set before Triton is imported, so it is set here,
before any test module imports disco_kernels' Triton kernels.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: compiled optimizer steps share Scion.step's code object, so
    without a reset the recompiles of earlier tests count towards dynamo's recompile limit in later ones."""
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_rank_group():
    """A one-rank gloo world in this process (so that DTensors and process groups exist), or the one
    another test left initialised."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()
