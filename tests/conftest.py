"""Shared pytest setup: importable repo root, the persistent gloo rank pools, the `gpu` marker."""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
_pythonpath = os.environ.get("PYTHONPATH", "")
if REPO_ROOT not in _pythonpath.split(os.pathsep):  # for subprocesses and pool workers
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, _pythonpath) if p)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped cleanly without one")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU: torch.cuda.is_available() is False on this host "
        "(no GPU or a CPU-only torch build)"
    )
    for item in gpu_items:
        item.add_marker(skip)


def _pool(world_size):
    from tests.rank_pool import RankPool

    pool = RankPool(world_size)
    try:
        pool.wait_ready()  # startup problems show up as a fixture error, and outside test timings
    except BaseException:
        pool.close()
        raise
    return pool


@pytest.fixture(scope="session")
def pool2():
    """Two persistent gloo ranks (started on first use, closed at session end): pool2.run(fn, ...)."""
    pool = _pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool4():
    """Four persistent gloo ranks (started on first use, closed at session end): pool4.run(fn, ...)."""
    pool = _pool(4)
    yield pool
    pool.close()
