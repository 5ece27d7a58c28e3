"""RoPE: reference vs complex multiplication, tables for 1-D, 2-D axial and multi-axis positions."""
import math

import pytest
import torch
from torch.library import opcheck

from fastdit.ops import rope, rope_freqs, rope_freqs_1d, rope_freqs_2d, rope_ref
from fastdit.testing import assert_close_to_reference


def rope_complex(x, freqs, interleaved):
    """Independent float64 formulation: channel pairs as complex numbers, times e^{iθ}."""
    x = x.double()
    rot = torch.view_as_complex(freqs.double().contiguous())  # (N, d/2) or (B, N, d/2)
    rot = rot[None, :, None, :] if rot.dim() == 2 else rot[:, :, None, :]  # broadcast over heads
    d = x.shape[-1]
    if interleaved:
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(z * rot).flatten(-2)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def flux_table(ids, axes_dims, theta):
    """Flux's EmbedND formula, written out: omega_k = 1 / theta**(2k/dim) per axis."""
    angles = []
    for i, dim in enumerate(axes_dims):
        scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        omega = 1.0 / theta ** scale
        angles.append(torch.einsum("...n,d->...nd", ids[..., i].double(), omega))
    a = torch.cat(angles, -1)
    return torch.stack([a.cos(), a.sin()], -1).float()


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("N,H,d", [(1, 2, 72), (7, 3, 64), (113, 2, 8)])
def test_reference_matches_complex_multiplication(N, H, d, interleaved):
    x = torch.randn(2, N, H, d, dtype=torch.float64)
    freqs = rope_freqs_1d(N, d, offset=3)
    torch.testing.assert_close(rope_ref(x, freqs, interleaved), rope_complex(x, freqs, interleaved),
                               rtol=1e-12, atol=1e-12)


def test_per_sample_tables():
    x = torch.randn(3, 5, 2, 16, dtype=torch.float64)
    ids = torch.randint(0, 50, (3, 5, 2))
    table = rope_freqs(ids, [8, 8])
    assert table.shape == (3, 5, 8, 2)
    torch.testing.assert_close(rope_ref(x, table), rope_complex(x, table, True), rtol=1e-12, atol=1e-12)
    for b in range(3):
        torch.testing.assert_close(rope_ref(x, table)[b], rope_ref(x[b:b + 1], rope_freqs(ids[b], [8, 8]))[0])


def test_tables_match_closed_forms():
    d, theta = 16, 10000.0
    t1 = rope_freqs_1d(5, d, theta)
    k = torch.arange(d // 2, dtype=torch.float64)
    angle = torch.arange(5, dtype=torch.float64)[:, None] * theta ** (-2 * k / d)
    torch.testing.assert_close(t1, torch.stack([angle.cos(), angle.sin()], -1).float())
    assert t1.dtype == torch.float32 and t1.shape == (5, 8, 2)
    # 2-D axial: token (r, c) of a 3 x 4 grid sits at r*4 + c; first d/4 pairs by row, the rest by column
    t2 = rope_freqs_2d(3, 4, d, theta)
    row, col = rope_freqs_1d(3, d // 2, theta), rope_freqs_1d(4, d // 2, theta)
    for r in range(3):
        for c in range(4):
            torch.testing.assert_close(t2[r * 4 + c], torch.cat([row[r], col[c]], 0))
    # Flux-style multi-axis ids (t, h, w) against Flux's formula
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(2.0), indexing="ij"), -1)
    ids = ids.reshape(-1, 3)
    torch.testing.assert_close(rope_freqs(ids, [4, 6, 6], 1000.0), flux_table(ids, [4, 6, 6], 1000.0))


def test_attention_scores_depend_only_on_relative_position():
    d = 32
    q, k = torch.randn(1, 1, 1, d, dtype=torch.float64), torch.randn(1, 1, 1, d, dtype=torch.float64)
    table = rope_freqs_1d(40, d)

    def score(m, n):
        return (rope_ref(q, table[m:m + 1]) * rope_ref(k, table[n:n + 1])).sum().item()

    assert math.isclose(score(3, 1), score(12, 10), rel_tol=1e-6)
    assert math.isclose(score(30, 5), score(26, 1), rel_tol=1e-6)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)


@pytest.mark.parametrize("interleaved", [True, False])
def test_inverse_undoes_the_rotation_and_keeps_pair_norms(interleaved):
    x = torch.randn(2, 9, 2, 24, dtype=torch.float64)
    table = rope_freqs_2d(3, 3, 24)
    y = rope_ref(x, table, interleaved)
    torch.testing.assert_close(rope_ref(y, table, interleaved, inverse=True), x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("impl", ["reference", "library_op"])
def test_gradcheck(interleaved, impl):
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    table = rope_freqs_1d(3, 8)
    if impl == "reference":
        assert torch.autograd.gradcheck(lambda x: rope_ref(x, table, interleaved), (x,))
    else:
        assert torch.autograd.gradcheck(lambda x: torch.ops.fastdit.rope(x, table, interleaved, False), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_backend_triton_follows_the_2x_rule(dtype, interleaved, device):
    x = torch.randn(2, 7, 3, 72).to(device, dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    table = rope_freqs_2d(7, 1, 72, device=device)
    out, ref, ref64 = (rope(x, table, interleaved, backend="triton"), rope_ref(x, table, interleaved),
                       rope_ref(x64, table, interleaved))
    assert_close_to_reference(out, ref, ref64, name="y")
    dy = torch.randn(x.shape).to(device, dtype)
    assert_close_to_reference(torch.autograd.grad(out, x, dy)[0], torch.autograd.grad(ref, x, dy)[0],
                              torch.autograd.grad(ref64, x64, dy.double())[0], name="dx")


def test_opcheck(device):
    qkv = torch.randn(2, 6, 3, 2, 16, dtype=torch.bfloat16, device=device)
    q = qkv.unbind(2)[0].requires_grad_()
    for interleaved in (True, False):
        opcheck(torch.ops.fastdit.rope.default, (q, rope_freqs_2d(2, 3, 16).to(device), interleaved, False))
    freqs = rope_freqs(torch.randint(0, 9, (2, 6, 1)), [16]).to(device)
    opcheck(torch.ops.fastdit.rope.default, (q, freqs, True, True))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="head dim must be even"):
        rope(torch.randn(1, 3, 2, 7), torch.zeros(3, 3, 2))
    with pytest.raises(ValueError, match=r"freqs must be \(N, d/2, 2\) = \(3, 4, 2\)"):
        rope(torch.randn(1, 3, 2, 8), rope_freqs_1d(4, 8))
    with pytest.raises(ValueError, match="x must be 4-D"):
        rope(torch.randn(3, 8), rope_freqs_1d(3, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_freqs_2d(2, 2, 18)
    with pytest.raises(ValueError, match="ids must be"):
        rope_freqs(torch.zeros(5, 2), [8])
    with pytest.raises(ValueError, match="freqs has dtype torch.float64"):
        rope(torch.randn(1, 3, 2, 8), rope_freqs_1d(3, 8).double(), backend="triton")
