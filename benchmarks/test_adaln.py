"""AdaLN modulation (LayerNorm + modulate) and the gated residual seam: fastdit's paths against stock
PyTorch eager and torch.compile, with the device copy as the ceiling (design.md §5).

Bytes: forward reads x and writes y (2 passes of x-sized data; modulation vectors are negligible);
forward+backward = 5 passes (fwd: r x, w y; bwd: r x, r dy, w dx). The gated seam forward reads x, y
and writes x', out (4 passes).
"""
import pytest
import torch
import torch.nn.functional as F

from fastdit.ops import adaln, adaln_modulate, gated_residual_adaln

SHAPES = [(64, 256, 1152), (2, 4096, 3072), (8, 4608, 1536)]  # DiT-XL/2 256px, Flux 1024px, SD3 1024px


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


# name -> (LN-modulate, gated seam); every peer is measured in the same process
IMPLS = {
    "eager-stock": (stock_modulate, stock_gated),
    "compile-stock": (torch.compile(stock_modulate, dynamic=False), torch.compile(stock_gated, dynamic=False)),
    "compile-fastdit-reference": (torch.compile(reference_modulate, dynamic=False),
                                  torch.compile(reference_gated, dynamic=False)),
    # the library op; until its Triton kernel lands it computes with the reference math
    ("fastdit-triton" if adaln.KERNEL_READY else "fastdit-op-reference-math"): (triton_modulate, triton_gated),
}


@pytest.mark.parametrize("B,N,D", SHAPES, ids=[f"{b}x{n}x{d}" for b, n, d in SHAPES])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_adaln_modulate(gpu_bench, direction, impl, B, N, D):
    modulate = IMPLS[impl][0]
    x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shift, scale = (torch.randn(B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    pass_bytes = x.numel() * x.element_size()
    shape = f"{B}x{N}x{D}"
    if direction == "fwd":
        with torch.no_grad():
            gpu_bench(lambda: modulate(x, shift, scale), group="adaln.fwd", impl=impl, shape=shape,
                      bytes=2 * pass_bytes)
    else:
        dy = torch.randn_like(x)
        gpu_bench(lambda: torch.autograd.grad(modulate(x, shift, scale), (x, shift, scale), dy),
                  group="adaln.fwd+bwd", impl=impl, shape=shape, bytes=5 * pass_bytes)


@pytest.mark.parametrize("B,N,D", SHAPES, ids=[f"{b}x{n}x{d}" for b, n, d in SHAPES])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_gated_residual_adaln(gpu_bench, impl, B, N, D):
    gated = IMPLS[impl][1]
    x, y = (torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gate, shift, scale = (torch.randn(B, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        gpu_bench(lambda: gated(x, y, gate, shift, scale), group="gated_adaln.fwd", impl=impl,
                  shape=f"{B}x{N}x{D}", bytes=4 * x.numel() * x.element_size())
