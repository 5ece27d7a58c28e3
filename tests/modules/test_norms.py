import pytest
import torch
import torch.nn.functional as F

from fastdit.modules import AdaLNModulation, ModulatedLayerNorm, RMSNorm, RotaryEmbedding
from fastdit.ops import adaln_modulate_ref, gated_residual_adaln_ref, rope_freqs, rope_ref


def test_adaln_modulation_is_zero_initialised_with_dit_keys():
    mod = AdaLNModulation(32, 6, cond_dim=48)
    assert list(mod.state_dict()) == ["1.weight", "1.bias"]
    assert mod[1].weight.shape == (6 * 32, 48)
    chunks = mod(torch.randn(3, 48))
    assert len(chunks) == 6 and all(c.shape == (3, 32) for c in chunks)
    assert all(c.abs().max() == 0 for c in chunks)


def test_adaln_modulation_computes_silu_linear_chunks():
    mod = AdaLNModulation(8, 2)
    torch.nn.init.normal_(mod[1].weight)
    torch.nn.init.normal_(mod[1].bias)
    c = torch.randn(4, 8)
    shift, scale = mod(c)
    full = F.linear(F.silu(c), mod[1].weight, mod[1].bias)
    torch.testing.assert_close(torch.cat([shift, scale], -1), full)
    per_token = mod(torch.randn(4, 5, 8))  # per-token conditioning
    assert per_token[0].shape == (4, 5, 8)


def test_modulated_layer_norm_forward_and_gated():
    norm = ModulatedLayerNorm(24)
    assert list(norm.state_dict()) == []
    x, y = torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    gate, shift, scale = torch.randn(3, 2, 24).unbind(0)
    torch.testing.assert_close(norm(x, shift, scale), adaln_modulate_ref(x, shift, scale))
    for a, b in zip(norm.gated(x, y, gate, shift, scale), gated_residual_adaln_ref(x, y, gate, shift, scale)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"ModulatedLayerNorm\(24\): x has last dimension 23"):
        norm(x[..., :23], shift, scale)


def test_rms_norm_module_is_a_drop_in_for_torch_rms_norm():
    ours, theirs = RMSNorm(16), torch.nn.RMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(theirs.weight)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, 3, 16)
    torch.testing.assert_close(ours(x), theirs(x))


def test_rotary_embedding_tables_and_apply():
    rot = RotaryEmbedding(16, axes_dims=[4, 6, 6])
    assert list(rot.state_dict()) == []
    ids = torch.randint(0, 9, (10, 3))
    x = torch.randn(2, 10, 2, 16)
    torch.testing.assert_close(rot(x, rot.table(ids)), rope_ref(x, rope_freqs(ids, [4, 6, 6])))
    assert rot.table_2d(2, 5).shape == (10, 8, 2)
    assert rot.table_1d(7, offset=2).shape == (7, 8, 2)
    with pytest.raises(ValueError, match="must sum to head_dim"):
        RotaryEmbedding(16, axes_dims=[4, 4])
    with pytest.raises(ValueError, match="needs axes_dims"):
        RotaryEmbedding(16).table(ids)
