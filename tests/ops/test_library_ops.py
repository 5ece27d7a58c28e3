"""opcheck for the backward library ops (the forward ops are opchecked beside their references, which
also exercises these through autograd). Inputs are what the forward ops save for backward."""
import pytest
import torch
from torch.library import opcheck

EPS = 1e-6


@pytest.mark.parametrize("per_token", [False, True])
def test_adaln_backward_ops(per_token):
    B, N, D = 2, 5, 24
    mshape = (B, N, D) if per_token else (B, D)
    x, y, dy = (torch.randn(B, N, D, dtype=torch.bfloat16) for _ in range(3))
    gate, shift, scale = (torch.randn(mshape) for _ in range(3))
    _, mean, rstd = torch.ops.fastdit.adaln_modulate(x, shift, scale, EPS)
    opcheck(torch.ops.fastdit.adaln_modulate_backward.default, (dy, x, shift, scale, mean, rstd))
    x_new, _, mean, rstd = torch.ops.fastdit.gated_residual_adaln(x, y, gate, shift, scale, EPS)
    opcheck(torch.ops.fastdit.gated_residual_adaln_backward.default,
            (torch.randn_like(x), dy, x_new, y, gate, shift, scale, mean, rstd))


def test_rms_norm_backward_op():
    x, dy = torch.randn(2, 5, 3, 16, dtype=torch.float16), torch.randn(2, 5, 3, 16, dtype=torch.float16)
    w = torch.randn(16)
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
