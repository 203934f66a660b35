"""Shared fixtures: long-lived gloo worker pools (real processes) for distributed tests.

Test tiers: ``python -m pytest -m "not slow" -q`` is the inner loop (single-process tests,
well under a minute); the full suite (``python -m pytest -q``, ``.ci/run``) adds the ``slow``
ones. Every test that uses the ``dist2``/``dist4`` pools is marked ``slow`` here, so new
distributed tests land in the full suite by default; modules that launch ``torchrun`` or other
processes mark themselves (``pytestmark = pytest.mark.slow``).
"""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

_POOLS = {}


def pytest_configure(config):
    # The inner loop (-m "not slow") runs the planner's property tests with fewer hypothesis
    # examples (the knob tests/placement reads at import; an explicit value wins); the full
    # suite keeps their default depth.
    if "not slow" in (config.getoption("markexpr", "") or ""):
        os.environ.setdefault("MODSE_PLANNER_EXAMPLES", "100")


def _pool(world_size):
    from modse_megatron.testing.distributed import DistributedPool

    if world_size not in _POOLS:
        _POOLS[world_size] = DistributedPool(world_size)
    return _POOLS[world_size]


@pytest.fixture(scope="module")
def _one_rank_world():
    from modse_megatron.testing.distributed import single_rank

    with single_rank() as fresh:
        yield fresh


@pytest.fixture
def one_rank(_one_rank_world):
    """This process as a 1-rank gloo world with megatron's parallel_state (TP=PP=EP=1; kept
    for the module), reseeded and with empty MoE trackers for each test like a pool task:
    single-process oracles in the fast tier call the same task functions the pool tests run."""
    _one_rank_world()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A small real corpus (60 stdlib sources) tokenized with a freshly trained BPE (512), built
    once per session for every test that launches ``modse-pretrain``."""
    from modse_megatron.testing.corpus import small_stdlib_corpus

    return small_stdlib_corpus(tmp_path_factory.mktemp("data"))


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


_POOL_FIXTURES = {"dist2", "dist4"}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if _POOL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
