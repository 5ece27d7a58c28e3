import pytest
import torch

from fastdit.modules import JointAttention
from fastdit.ops import rope_freqs_1d, rope_freqs_2d


@pytest.mark.parametrize("qk_norm", [False, True])
def test_self_attention_matches_timm_attention(qk_norm, stock):
    stock = stock.randomize_(stock.Attention(64, 4, qk_norm=qk_norm))
    ours = JointAttention(64, 4, qk_norm=qk_norm)
    ours.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(2, 7, 64)
    out, none = ours(x)
    assert none is None
    torch.testing.assert_close(out, stock(x))


def test_joint_attention_module_shapes_rope_and_backends_agree(stock, device):
    attn = stock.randomize_(JointAttention(128, 2, joint=True, qk_norm=True), std=0.05).to(device)
    x, ctx = torch.randn(2, 12, 128, device=device), torch.randn(2, 5, 128, device=device)
    lengths = torch.tensor([2, 5], device=device)
    args = (x, ctx, lengths, rope_freqs_2d(3, 4, 64, device=device), rope_freqs_1d(5, 64, device=device))
    ref = attn(*args)
    assert ref[0].shape == x.shape and ref[1].shape == ctx.shape
    attn.backend = "triton"
    for a, b in zip(attn(*args), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    no_rope = attn(x, ctx, lengths)
    assert not torch.allclose(no_rope[0], ref[0])


def test_joint_attention_module_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        JointAttention(30, 4)
    attn = JointAttention(32, 2)
    with pytest.raises(ValueError, match="joint=False"):
        attn(torch.randn(1, 3, 32), torch.randn(1, 2, 32))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 32\)"):
        attn(torch.randn(1, 3, 16))
    joint = JointAttention(32, 2, joint=True)
    with pytest.raises(ValueError, match=r"context must be \(B, N_txt, 32\) with B = 1"):
        joint(torch.randn(1, 3, 32), torch.randn(2, 2, 32))
