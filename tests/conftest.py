"""Shared test helpers: the repository root on sys.path, a host-sync trap and one intra-op thread."""
import contextlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FASHION_DIR = "/usr/share/datasets/fashion-mnist"

# Tensor methods that copy a value to the host (a device sync on GPU).
_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")


@contextlib.contextmanager
def forbid_host_sync():
    """Make every Tensor→host conversion raise inside the block (CPU stand-in for
    torch.cuda.set_sync_debug_mode("error"))."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def trap(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called inside a sync-free region")
        return raiser

    for name in _SYNC_METHODS:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.fixture
def no_host_sync():
    return forbid_host_sync


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` inside the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models on a busy 2-core machine run many times slower
    with two (OpenMP's threads spin), and the runner's subprocesses in these tests use one, so the
    same count gives the same arithmetic (CPU kernels may round differently per thread count).
    A file opts in whole with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with torch_threads(1):
        yield
