"""Shared test helpers: the repository root on sys.path and a host-sync trap."""
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
