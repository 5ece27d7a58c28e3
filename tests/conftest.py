"""Test-suite setup: deterministic per-test seeds, Triton's interpreter on CPU-only machines, and a
guard against importing a fastdit that has no kernels (see README, "Development")."""
import os
import random
import sys
import zlib

# `python -m pytest` from the repository root puts the root on sys.path. Then the source tree's
# fastdit/ (which has no kernels/: they are mapped there by the install) and a top-level `kernels`
# (the import name of Hugging Face's package, which diffusers probes for) would shadow the installed
# package. Tests exercise the install, so the root comes off the path however pytest was started.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402  (after the sys.path fix on purpose)
import torch  # noqa: E402

# Triton kernels run on CPU only through the interpreter; it must be on before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import fastdit.kernels  # noqa: F401  (mapped from kernels/ by the install)
except ImportError as err:  # pragma: no cover - environment problem, not a test failure
    pytest.exit(f"fastdit is importable but fastdit.kernels is not ({err}). This happens when the source "
                f"tree's fastdit/ shadows a non-editable install; install with `pip install -e .`.", returncode=4)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# On a GPU machine the interpreter stays off (it would run the CUDA tests' kernels on the host too), so a test
# that runs a Triton kernel on CPU tensors cannot run there: it is reported as skipped, with this reason, when
# it fails with the error that says so (its CUDA counterpart runs through the ``device`` fixture).
KERNELS_ON_CUDA_ONLY = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
_CPU_KERNEL_ERRORS = ("Triton kernels run on CUDA (or on CPU with TRITON_INTERPRET=1)",
                      "cannot be accessed from Triton (cpu tensor?)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if KERNELS_ON_CUDA_ONLY and report.failed and call.excinfo is not None \
            and any(m in str(call.excinfo.value) for m in _CPU_KERNEL_ERRORS):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           "Skipped: runs a Triton kernel on CPU tensors, which needs TRITON_INTERPRET=1; "
                           "this GPU machine runs the kernels on CUDA (the `device` fixture's tests)")


@pytest.fixture
def device():
    """Where fast-path tests run: the GPU when there is one, else the CPU (Triton's interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_rngs(request):
    """Every test gets its own fixed seed (fresh random inputs per test, reproducible failures).

    ``FASTDIT_TEST_SEED=K`` shifts every test's seed, to check that no tolerance passes by luck:
    run the suite under a few values of K (see README, "Development")."""
    salt = os.environ.get("FASTDIT_TEST_SEED", "")
    seed = zlib.crc32((request.node.nodeid + (f"#{salt}" if salt else "")).encode()) & 0x7FFFFFFF
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny
    convolutions gain nothing from threads, and on a busy 2-core machine OpenMP threads that wait for each
    other make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
