"""RoPE and fused QK-norm + RoPE: fastdit's kernel against stock PyTorch eager and torch.compile.

Shapes (B, H, N, d) as in the baselines: (2, 24, 4608, 128) [Flux/SD3 1024px], (64, 16, 256, 72)
[DiT-XL/2]; tensors live as (B, N, H, d) views of a fused QKV projection, as attention makes them.
Bytes (q-sized tensors, each read or written once):
- rope on q alone (the baselines' figure): fwd 2, bwd 2;
- rope on q and k in one launch: fwd 4, bwd 4, fwd+bwd 8;
- QK RMSNorm + RoPE on q and k: fwd 4 (r q, k; w q', k'), bwd 6 (r dq', dk', q, k; w dq, dk), fwd+bwd 10.
"""
import pytest
import torch
from harness import direction_builder

from fastdit.ops import qk_norm_rope, rope, rope_freqs_2d, rotary

SHAPES = [(2, 24, 4608, 128), (64, 16, 256, 72)]
SHAPE_IDS = [f"{b}x{h}x{n}x{d}" for b, h, n, d in SHAPES]
PASSES = {"rope_q": {"fwd": 2, "bwd": 2, "fwd+bwd": 4}, "rope_qk": {"fwd": 4, "bwd": 4, "fwd+bwd": 8},
          "qknorm_rope": {"fwd": 4, "bwd": 6, "fwd+bwd": 10}}


def stock_rotate(x, freqs):
    """The usual PyTorch RoPE (Flux's apply_rope): pairs as the last axis, float32 math."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    cos, sin = freqs[..., 0][None, :, None, :, None], freqs[..., 1][None, :, None, :, None]
    rot = torch.cat([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (…, d/2, 2, 2)
    return (rot[..., 0] * x_[..., 0] + rot[..., 1] * x_[..., 1]).reshape(x.shape).type_as(x)


def stock_rmsnorm(x, w):
    return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), w, eps=1e-6).type_as(x)


def stock_rope_q(q, freqs):
    return stock_rotate(q, freqs)


def stock_rope_qk(q, k, freqs):
    return stock_rotate(q, freqs), stock_rotate(k, freqs)


def stock_qknorm_rope(q, k, qw, kw, freqs):
    return stock_rotate(stock_rmsnorm(q, qw), freqs), stock_rotate(stock_rmsnorm(k, kw), freqs)


def triton_rope_q(q, freqs):
    return rope(q, freqs, backend="triton")


def triton_rope_qk(q, k, freqs):
    return qk_norm_rope(q, k, freqs=freqs, backend="triton")


def triton_qknorm_rope(q, k, qw, kw, freqs):
    return qk_norm_rope(q, k, qw, kw, freqs, backend="triton")


STOCK = {"rope_q": stock_rope_q, "rope_qk": stock_rope_qk, "qknorm_rope": stock_qknorm_rope}
IMPLS = {
    "eager-stock": STOCK,
    "compile-stock": {k: torch.compile(f, dynamic=False) for k, f in STOCK.items()},
    ("fastdit-triton" if rotary.KERNEL_READY else "fastdit-op-reference-math"): {
        "rope_q": triton_rope_q, "rope_qk": triton_rope_qk, "qknorm_rope": triton_qknorm_rope},
}


@pytest.mark.parametrize("B,H,N,d", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("direction", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("form", list(PASSES))
def test_rope(gpu_bench, randn, form, direction, impl, B, H, N, d):
    fn = IMPLS[impl][form]
    qkv = randn(B, N, 3, H, d)
    q, k = (t.requires_grad_() for t in qkv.unbind(2)[:2])
    freqs = rope_freqs_2d(N // 64 if N % 64 == 0 else N, 64 if N % 64 == 0 else 1, d, device="cuda")
    weights = [randn(d, dtype=torch.float32, requires_grad=True) for _ in range(2)]
    inputs = {"rope_q": [q], "rope_qk": [q, k], "qknorm_rope": [q, k] + weights}[form]
    q_bytes = q.numel() * q.element_size()
    kwargs = dict(group=f"{form}.{direction}", impl=impl, shape=f"{B}x{H}x{N}x{d}",
                  bytes=PASSES[form][direction] * q_bytes)

    gpu_bench(direction_builder(direction, fn, inputs, (freqs,)), **kwargs)
