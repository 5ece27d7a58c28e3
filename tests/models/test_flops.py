"""FLOP counts: DiT-XL/2 at 256 px is the paper's figure, training is 3 × forward, and the analytic
counts equal what torch.utils.flop_counter measures on small models (matmuls, convolutions and the
attention matmuls, which the math SDPA backend runs as bmm)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fastdit.models import (DiT, DiTConfig, MMDiT, MMDiTConfig, dit_flop_breakdown, dit_flops, mmdit_flop_breakdown,
                            mmdit_flops, training_flops)


def test_dit_xl_2_at_256px_is_the_papers_count():
    """118.6 G multiply-adds (Peebles & Xie, table 4) = 237.2 GFLOP forward; 712 GFLOP per training
    image. From the config alone: no XL model is built."""
    cfg = DiTConfig.from_name("DiT-XL/2")
    forward = dit_flops(cfg, 32, 32)
    assert forward == pytest.approx(2 * 118.6e9, rel=0.01)
    assert training_flops(forward) == pytest.approx(712e9, rel=0.01)
    assert dit_flops(cfg) == forward  # the configured input size is the default
    parts = dit_flop_breakdown(cfg, 32, 32)
    assert parts["attention"] == 28 * 4 * 256 ** 2 * 1152  # QKᵀ and AV: 4·N²·D per layer
    assert parts["patch_embed"] == 2 * 256 * (4 * 2 * 2) * 1152


def test_paper_counts_of_the_other_sizes():
    """The paper's Gflops (multiply-adds) for DiT-S/B/L at 256 px, patch 2, 4 and 8."""
    paper = {"DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
             "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05}
    for name, gmacs in paper.items():
        assert dit_flops(DiTConfig.from_name(name)) / 2e9 == pytest.approx(gmacs, rel=0.01), name


def _measured(model, *args):
    """FLOPs torch.utils.flop_counter counts for one forward and for forward + backward."""
    with sdpa_kernel(SDPBackend.MATH):  # fused CPU attention kernels are not in its registry; math runs bmm
        with FlopCounterMode(display=False) as forward:
            model(*args)
        with FlopCounterMode(display=False) as both:
            model(*args).square().sum().backward()
    return forward.get_total_flops(), both.get_total_flops()


def test_dit_count_equals_the_measured_count():
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                          num_classes=10), backend="reference")
    batch, height, width = 3, 8, 12
    x = torch.randn(batch, 4, height, width)
    forward, both = _measured(model, x, torch.rand(batch) * 1000, torch.tensor([1, 2, 10]))
    assert forward == batch * model.flops_per_sample(height, width)
    # backward is ~2 × forward (less the patch embedding's input gradient, which is not needed)
    assert both == pytest.approx(batch * model.flops_per_sample(height, width, training=True), rel=0.02)


@pytest.mark.parametrize("pos_embed", ["rope", "learned"])
def test_mmdit_count_equals_the_measured_count(pos_embed):
    cfg = MMDiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=2, caption_dim=24,
                      pos_embed=pos_embed, learn_sigma=True)
    model = MMDiT(cfg, backend="reference")
    batch, height, width, caption_len = 2, 8, 12, 7
    args = (torch.randn(batch, 4, height, width), torch.rand(batch), torch.randn(batch, caption_len, 24),
            torch.tensor([7, 3]))
    forward, both = _measured(model, *args)
    assert forward == batch * model.flops_per_sample(height, width, caption_len=caption_len)
    assert both == pytest.approx(batch * model.flops_per_sample(height, width, caption_len=caption_len,
                                                                training=True), rel=0.03)
    assert model.flops_per_sample(height, width, caption_len=caption_len) == mmdit_flops(
        cfg, height, width, caption_len=caption_len)


def test_counts_follow_the_input_size():
    cfg = DiTConfig.from_name("DiT-B/2")
    small, large = dit_flop_breakdown(cfg, 32, 32), dit_flop_breakdown(cfg, 64, 32)  # 2 × the tokens
    assert large["attention"] == 4 * small["attention"] and large["mlp"] == 2 * small["mlp"]
    assert large["adaln"] == small["adaln"]  # per sample, not per token
    mm = MMDiTConfig.from_name("MMDiT-S/2")
    short, long = (mmdit_flop_breakdown(mm, 32, 32, caption_len=n) for n in (0, 77))
    assert long["caption_stream"] > 0 == short["caption_stream"]
    assert long["attention"] == 12 * 2 * 2 * (256 + 77) ** 2 * 384
    with pytest.raises(ValueError, match="multiple of the patch size 2"):
        dit_flops(cfg, 31, 32)
