import pathlib

import pytest
import torch

from fastdit.kernels import _utils

ON_GPU = torch.cuda.is_available()
_HERE = pathlib.Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Triton's interpreter runs programs one after another in numpy: on a CPU-only machine, the cases
    a test module's ``slow_on_cpu(**params)`` names are marked slow (on a GPU everything runs)."""
    if ON_GPU:
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        rule = getattr(getattr(item, "module", None), "slow_on_cpu", None)
        if callspec is not None and rule is not None and _HERE in pathlib.Path(str(item.fspath)).parents:
            if rule(**callspec.params):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a launcher allocates starts as NaN: an element a kernel does not write fails."""
    monkeypatch.setattr(_utils, "POISON_OUTPUTS", True)
