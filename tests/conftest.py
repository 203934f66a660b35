"""Shared fixtures: long-lived gloo worker pools (real processes) for distributed tests."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

_POOLS = {}


def _pool(world_size):
    from modse_megatron.testing.distributed import DistributedPool

    if world_size not in _POOLS:
        _POOLS[world_size] = DistributedPool(world_size)
    return _POOLS[world_size]


@pytest.fixture(scope="session")
def dist2():
    """Two gloo ranks; ``dist2.run(fn, tp=.., ep=..)`` runs ``fn`` on both."""
    return _pool(2)


@pytest.fixture(scope="session")
def dist4():
    """Four gloo ranks (tests with EP=4 or TP×EP layouts)."""
    return _pool(4)


def pytest_sessionfinish(session, exitstatus):
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
