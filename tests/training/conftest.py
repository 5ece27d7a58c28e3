"""Fixtures of the trainer tests: the shared toy module (loaded by path: tests are no package)."""
import importlib.util
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_toy():
    if "fastdit_test_toy" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fastdit_test_toy", os.path.join(HERE, "toy.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastdit_test_toy"] = module
        spec.loader.exec_module(module)
    return sys.modules["fastdit_test_toy"]


@pytest.fixture(scope="session")
def toy():
    return _load_toy()


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """In-process trainer tests run as one process whatever the calling shell exported, on one thread
    (tiny models run many times faster than with threads contending for a loaded 2-core machine)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
