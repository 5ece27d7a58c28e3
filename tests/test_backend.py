import subprocess
import sys

import pytest
import torch

import fastdit
from fastdit.backend import get_backend, resolve_backend, set_backend, use_backend
from fastdit.modules import DiTBlock, set_module_backend


def test_default_is_auto_and_context_nests_and_restores():
    assert get_backend() == "auto"
    with use_backend("reference"):
        assert get_backend() == "reference"
        with use_backend("triton"):
            assert resolve_backend(None) == "triton"
            assert resolve_backend("reference") == "reference"  # an explicit argument wins
        assert get_backend() == "reference"
    assert get_backend() == "auto"


def test_context_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with use_backend("reference"):
            raise RuntimeError("boom")
    assert get_backend() == "auto"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto, triton, reference"):
        with use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown fastdit backend"):
        set_backend("fast")
    with pytest.raises(ValueError, match="unknown fastdit backend 'fast'"):
        DiTBlock(32, 2, backend="fast")(torch.randn(1, 2, 32), torch.randn(1, 32))


def _run(code, env_value):
    env = {"FASTDIT_BACKEND": env_value, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_environment_variable_sets_the_default():
    out = _run("import fastdit; print(fastdit.get_backend())", "Reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    bad = _run("import fastdit", "turbo")
    assert bad.returncode != 0 and "FASTDIT_BACKEND" in bad.stderr


def test_set_module_backend_reaches_every_fastdit_module():
    block = DiTBlock(32, 2)
    set_module_backend(block, "reference")
    assert block.norm1.backend == block.norm2.backend == block.attn.backend == "reference"
    with pytest.raises(ValueError):
        set_module_backend(block, "nope")


def test_package_exports():
    assert fastdit.BACKENDS == ("auto", "triton", "reference")


def test_pick_device_names_what_is_wrong():
    from fastdit.backend import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda:1")
