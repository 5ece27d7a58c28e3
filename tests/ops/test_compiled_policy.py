"""Which path "auto" takes inside a torch.compile graph (fastdit.ops._common.compiled_kernel_pays): the library
op only for training-size ops, since Inductor's fusion of the reference math won everywhere else it was
measured. "triton" always takes the op; eager "auto" is unchanged."""
import pytest
import torch

from fastdit.ops._common import COMPILED_MIN_ELEMENTS, compiled_kernel_pays, use_triton


@pytest.mark.parametrize("elements,grad,expected", [
    (COMPILED_MIN_ELEMENTS, True, True), (COMPILED_MIN_ELEMENTS - 1, True, False),
    (128 * 256 * 1152, True, True),  # DiT-XL/2 bs128 training: kernels measured faster
    (4096 * 3072, True, False),  # Flux bs1: the reference path measured faster
    (128 * 256 * 1152, False, False),  # inference: Inductor's cross-block fusion measured faster
])
def test_compiled_kernel_pays(elements, grad, expected):
    assert compiled_kernel_pays(elements, grad) is expected


@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
@pytest.mark.parametrize("work", [(COMPILED_MIN_ELEMENTS, True), (1000, True), (COMPILED_MIN_ELEMENTS, False)])
def test_use_triton_follows_the_policy_only_for_auto_inside_a_compile(monkeypatch, compiling, backend, work):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    chosen = use_triton("adaln_modulate", backend, lambda: None, True, lambda: work)
    if backend == "reference":
        assert chosen is False
    elif backend == "triton" or not compiling:
        assert chosen is True
    else:
        assert chosen is compiled_kernel_pays(*work)


def test_without_a_kernel_auto_takes_the_reference_whatever_the_size(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert use_triton("adaln_modulate", "auto", lambda: None, False, lambda: (1 << 30, True)) is False
    assert use_triton("adaln_modulate", "auto", lambda: "no CUDA", True, lambda: (1 << 30, True)) is False
