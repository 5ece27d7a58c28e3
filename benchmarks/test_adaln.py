"""AdaLN modulation (LayerNorm + modulate) and the gated-residual seam: fastdit's fused kernels against
stock PyTorch eager and torch.compile (specialised per shape), with the device copy as the ceiling.

Bytes, counting each x-sized tensor read or written once (modulation vectors are negligible):
- LN-modulate: fwd 2 (r x, w out); bwd 3 (r x, r dout, w dx); fwd+bwd 5.
- gated seam:  fwd 4 (r x, r y, w x', w out); bwd 6 (r dx', r dout, r x', r y, w dx, w dy); fwd+bwd 10.
bwd is timed as ``autograd.grad`` over a retained graph, for every peer alike.
"""
import pytest
import torch
from harness import direction_builder
import torch.nn.functional as F

from fastdit.ops import adaln, adaln_modulate, gated_residual_adaln

SHAPES = [(64, 256, 1152), (2, 4096, 3072), (8, 4608, 1536)]  # DiT-XL/2 256px, Flux 1024px, SD3 1024px
SHAPE_IDS = [f"{b}x{n}x{d}" for b, n, d in SHAPES]
PASSES = {"plain": {"fwd": 2, "bwd": 3, "fwd+bwd": 5}, "gated": {"fwd": 4, "bwd": 6, "fwd+bwd": 10}}


def stock_modulate(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def stock_gated(x, y, gate, shift, scale):
    x = x + gate[:, None] * y
    return x, stock_modulate(x, shift, scale)


def reference_modulate(x, shift, scale):
    return adaln_modulate(x, shift, scale, backend="reference")


def reference_gated(*args):
    return gated_residual_adaln(*args, backend="reference")


def triton_modulate(x, shift, scale):
    return adaln_modulate(x, shift, scale, backend="triton")


def triton_gated(*args):
    return gated_residual_adaln(*args, backend="triton")


IMPLS = {  # name -> {"plain": fn, "gated": fn}; every peer is measured in the same process
    "eager-stock": {"plain": stock_modulate, "gated": stock_gated},
    "compile-stock": {"plain": torch.compile(stock_modulate, dynamic=False),
                      "gated": torch.compile(stock_gated, dynamic=False)},
    "compile-fastdit-reference": {"plain": torch.compile(reference_modulate, dynamic=False),
                                  "gated": torch.compile(reference_gated, dynamic=False)},
    ("fastdit-triton" if adaln.KERNEL_READY else "fastdit-op-reference-math"): {
        "plain": triton_modulate, "gated": triton_gated},
}


def _inputs(randn, form, B, N, D):
    def t(*shape):
        return randn(*shape, requires_grad=True)
    if form == "plain":
        return [t(B, N, D), t(B, D), t(B, D)]
    return [t(B, N, D), t(B, N, D), t(B, D), t(B, D), t(B, D)]


@pytest.mark.parametrize("B,N,D", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("direction", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("form", ["plain", "gated"])
def test_adaln(gpu_bench, randn, form, direction, impl, B, N, D):
    fn = IMPLS[impl][form]
    inputs = _inputs(randn, form, B, N, D)
    x_bytes = inputs[0].numel() * inputs[0].element_size()
    kwargs = dict(group=f"{'adaln' if form == 'plain' else 'gated_adaln'}.{direction}", impl=impl,
                  shape=f"{B}x{N}x{D}", bytes=PASSES[form][direction] * x_bytes)

    gpu_bench(direction_builder(direction, fn, inputs), **kwargs)
