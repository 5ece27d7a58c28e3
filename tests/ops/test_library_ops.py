"""opcheck for the backward library ops (the forward ops are opchecked beside their references, which
also exercises these through autograd). Inputs are what the forward ops save for backward."""
import pytest
import torch
from torch.library import opcheck

EPS = 1e-6


@pytest.mark.parametrize("per_token", [False, True])
def test_adaln_backward_ops(per_token, device):
    B, N, D = 2, 5, 24
    mshape = (B, N, D) if per_token else (B, D)
    x, y, dy = (torch.randn(B, N, D, dtype=torch.bfloat16, device=device) for _ in range(3))
    gate, shift, scale = (torch.randn(mshape, device=device) for _ in range(3))
    _, mean, rstd = torch.ops.fastdit.adaln_modulate(x, shift, scale, EPS)
    opcheck(torch.ops.fastdit.adaln_modulate_backward.default, (dy, x, shift, scale, mean, rstd))
    x_new, _, mean, rstd = torch.ops.fastdit.gated_residual_adaln(x, y, gate, shift, scale, EPS)
    opcheck(torch.ops.fastdit.gated_residual_adaln_backward.default,
            (torch.randn_like(x), dy, x_new, y, gate, shift, scale, mean, rstd))


def test_rms_norm_backward_op(device):
    x, dy = (torch.randn(2, 5, 3, 16, dtype=torch.float16, device=device) for _ in range(2))
    w = torch.randn(16, device=device)
    _, rstd = torch.ops.fastdit.rms_norm(x, w, EPS)
    opcheck(torch.ops.fastdit.rms_norm_backward.default, (dy, x, w, rstd))


@pytest.mark.parametrize("N_txt", [0, 3])
def test_joint_attention_backward_op(N_txt):
    img = [torch.randn(2, 5, 2, 16, dtype=torch.bfloat16) for _ in range(3)]
    txt = [torch.randn(2, N_txt, 2, 16, dtype=torch.bfloat16) for _ in range(3)]
    mask = (torch.arange(N_txt) < torch.tensor([[1], [N_txt]])) if N_txt else None
    o_img, o_txt, lse = torch.ops.fastdit.joint_attention(*img, *txt, mask, 0.25)
    opcheck(torch.ops.fastdit.joint_attention_backward.default,
            (torch.randn_like(o_img), torch.randn_like(o_txt), *img, *txt, o_img, o_txt, lse, mask, 0.25))


@pytest.mark.parametrize("with_norm", [False, True])
def test_qk_norm_rope_ops(with_norm, device):
    from fastdit.ops import rope_freqs_2d
    q, k = (torch.randn(2, 6, 3, 16, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(2))
    qw, kw = (torch.randn(16, device=device, requires_grad=with_norm) if with_norm else None for _ in range(2))
    freqs = rope_freqs_2d(2, 3, 16).to(device)
    opcheck(torch.ops.fastdit.qk_norm_rope.default, (q, k, qw, kw, freqs, EPS, True))
    q_out, k_out, q_rstd, k_rstd = torch.ops.fastdit.qk_norm_rope(q, k, qw, kw, freqs, EPS, True)
    opcheck(torch.ops.fastdit.qk_norm_rope_backward.default,
            (torch.randn_like(q_out), torch.randn_like(k_out), q.detach(), k.detach(),
             *(None if w is None else w.detach() for w in (qw, kw)), freqs, q_rstd, k_rstd, True))
