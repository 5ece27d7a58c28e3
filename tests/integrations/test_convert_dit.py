"""Converters between diffusers' DiTTransformer2DModel and fastdit's DiT: equal outputs (float64, eval), exact
round trips of the state dicts, and clear errors for what one side cannot hold."""
import copy
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffusers.models.embeddings as diffusers_embeddings  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402

from fastdit.integrations.diffusers.convert_dit import (diffusers_config_from_dit, diffusers_from_dit,  # noqa: E402
                                                        dit_config_from_diffusers, dit_from_diffusers)
from fastdit.models import DiT, DiTConfig  # noqa: E402
from fastdit.models.layers import timestep_embedding  # noqa: E402
from fastdit.testing import assert_close_to_reference  # noqa: E402

NUM_CLASSES = 5


def tiny_diffusers(learn_sigma=True, head_dim=36, layers=2, tie=True, **overrides):
    kwargs = dict(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                  out_channels=8 if learn_sigma else 4, num_layers=layers, sample_size=8, patch_size=2,
                  num_embeds_ada_norm=NUM_CLASSES, **overrides)
    model = DiTTransformer2DModel(**kwargs)
    with torch.no_grad():
        for p in model.parameters():  # AdaLN-Zero and the output start at zero: perturb everything
            p.add_(torch.randn_like(p), alpha=0.1)
    if tie:
        tie_embedders_(model)
    return model.eval()


def tie_embedders_(model):
    """Pretrained diffusers DiTs hold equal per-block embedder copies; random ones do not."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


def timestep_embedding_float64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                               max_period=10000):
    """diffusers' get_timestep_embedding computed in float64 instead of float32 (its only float32 step)."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64, device=timesteps.device)
    emb = timesteps[:, None].double() * torch.exp(exponent / (half - downscale_freq_shift))[None] * scale
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


@pytest.fixture
def float64_timesteps(monkeypatch):
    monkeypatch.setattr(diffusers_embeddings, "get_timestep_embedding", timestep_embedding_float64)


def inputs(dtype=torch.float64, batch=5):
    x = torch.randn(batch, 4, 8, 8, dtype=dtype)
    t = torch.cat([torch.tensor([0.0, 999.0]), torch.rand(batch - 2) * 1000]).to(dtype)
    y = torch.randint(0, NUM_CLASSES + 1, (batch,))
    y[0] = NUM_CLASSES  # the null class (classifier-free guidance)
    return x, t, y


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def states_equal(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("learn_sigma, head_dim", [(True, 36), (False, 32)])
def test_forward_equals_diffusers_in_float64(learn_sigma, head_dim, float64_timesteps):
    theirs = tiny_diffusers(learn_sigma, head_dim).double()
    ours = dit_from_diffusers(theirs, backend="reference")
    assert ours.config.learn_sigma is learn_sigma and ours.config.num_classes == NUM_CLASSES
    assert not ours.training
    x, t, y = inputs()
    with torch.no_grad():
        expected = theirs(x, t, y).sample
        got = ours(x, t, y)
    assert got.shape == expected.shape == (5, 8 if learn_sigma else 4, 8, 8)
    assert relative_error(got, expected) < 1e-10
    # and back: the diffusers copy computes the same (the float64 embedding patch applies to it too)
    with torch.no_grad():
        assert relative_error(diffusers_from_dit(ours)(x, t, y).sample, expected) < 1e-10


def test_float32_timestep_embedding_is_bitwise_diffusers():
    t = torch.cat([torch.tensor([0.0, 1.0, 999.0]), torch.rand(13) * 1000])
    expected = diffusers_embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)(t)
    assert torch.equal(timestep_embedding(t, 256, freq_shift=1), expected)
    # shift 0 is the official DiT (and diffusers' shift 0): also bitwise
    expected0 = diffusers_embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert torch.equal(timestep_embedding(t, 256), expected0)


def test_float32_forward_within_twice_diffusers_float32_error(monkeypatch):
    theirs = tiny_diffusers()
    ours = dit_from_diffusers(theirs, backend="reference")
    assert ours.x_embedder.proj.weight.dtype == torch.float32
    x, t, y = inputs(torch.float32)
    with torch.no_grad():
        got = ours(x, t, y)
        reference = theirs(x, t, y).sample  # diffusers in float32, as users run it
        monkeypatch.setattr(diffusers_embeddings, "get_timestep_embedding", timestep_embedding_float64)
        truth = copy.deepcopy(theirs).double()(x.double(), t.double(), y).sample
    assert_close_to_reference(got, reference, truth, name="DiT output")


def test_round_trip_diffusers_fastdit_diffusers_is_exact():
    theirs = tiny_diffusers(norm_eps=3e-6)
    ours = dit_from_diffusers(theirs)
    assert ours.config.mlp_norm_eps == 3e-6 and ours.config.timestep_freq_shift == 1
    assert all(block.norm2.eps == 3e-6 and block.norm1.eps == 1e-6 for block in ours.blocks)
    back = diffusers_from_dit(ours)
    states_equal(back.state_dict(), theirs.state_dict())
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert strip(back.config) == strip(theirs.config)
    assert torch.equal(back.pos_embed.pos_embed, theirs.pos_embed.pos_embed)
    # tensors are copies, not shared
    assert back.proj_out_2.weight.data_ptr() != ours.final_layer.linear.weight.data_ptr()
    assert ours.final_layer.linear.weight.data_ptr() != theirs.proj_out_2.weight.data_ptr()
    assert all(p.requires_grad for p in ours.parameters()) and all(p.requires_grad for p in back.parameters())


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_round_trip_fastdit_diffusers_fastdit_is_exact(learn_sigma):
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                       num_classes=NUM_CLASSES, learn_sigma=learn_sigma, timestep_freq_shift=1, mlp_norm_eps=1e-6)
    ours = DiT(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    theirs = diffusers_from_dit(ours)
    assert theirs.config.norm_eps == 1e-6 and theirs.config.out_channels == (8 if learn_sigma else 4)
    emb = [b.norm1.emb.state_dict() for b in theirs.transformer_blocks]
    for block_emb in emb[1:]:
        states_equal(block_emb, emb[0])
    back = dit_from_diffusers(theirs)
    states_equal(back.state_dict(), ours.state_dict())
    assert back.config == ours.config
    assert back.training and theirs.training  # the source's mode carries over


def test_converted_state_dicts_load_strictly_into_fresh_models():
    theirs = tiny_diffusers()
    ours = dit_from_diffusers(theirs)
    fresh = DiT(ours.config)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    states_equal(fresh.state_dict(), ours.state_dict())
    back = diffusers_from_dit(ours)
    fresh_theirs = DiTTransformer2DModel(**diffusers_config_from_dit(ours.config))
    fresh_theirs.load_state_dict(back.state_dict(), strict=True)
    states_equal(fresh_theirs.state_dict(), theirs.state_dict())


def test_untied_per_block_embedders_raise_naming_block_and_tensor():
    theirs = tiny_diffusers(layers=3)
    with torch.no_grad():
        theirs.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[1, 3] += 1e-3
    with pytest.raises(ValueError, match=r"block 2.*transformer_blocks\.2\.norm1\.emb\.class_embedder"
                                         r"\.embedding_table\.weight"):
        dit_from_diffusers(theirs)
    untied = tiny_diffusers(tie=False)  # fresh random diffusers models have independent copies
    with pytest.raises(ValueError, match=r"block 1.*transformer_blocks\.1\.norm1\.emb\.timestep_embedder"
                                         r"\.linear_1\.weight"):
        dit_from_diffusers(untied)


def test_dtype_device_and_mode_are_kept():
    theirs = tiny_diffusers().to(torch.bfloat16).train()
    ours = dit_from_diffusers(theirs)
    assert ours.training
    assert {t.dtype for t in ours.state_dict().values()} == {torch.bfloat16}
    back = diffusers_from_dit(ours)
    assert back.training and back.pos_embed.pos_embed.dtype == torch.bfloat16
    states_equal(back.state_dict(), theirs.state_dict())


BASE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10)


@pytest.mark.parametrize("field, value", [
    ("norm_type", "ada_norm"), ("norm_type", "layer_norm"), ("num_embeds_ada_norm", None),
    ("num_embeds_ada_norm", 0), ("activation_fn", "gelu"), ("attention_bias", False), ("upcast_attention", True),
    ("norm_elementwise_affine", True), ("dropout", 0.1), ("out_channels", 6), ("out_channels", 12),
    ("norm_eps", 0.0), ("some_new_field", 1),
])
def test_unsupported_diffusers_configs_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dit_config_from_diffusers({**BASE, field: value})


def test_config_from_diffusers_defaults_and_dropout_opt_in():
    config = dit_config_from_diffusers({**BASE, "out_channels": None, "_class_name": "DiTTransformer2DModel"})
    assert (config.learn_sigma, config.hidden_size, config.depth, config.num_heads, config.input_size,
            config.num_classes, config.class_dropout_prob, config.mlp_norm_eps, config.timestep_freq_shift,
            config.frequency_embedding_size, config.mlp_ratio) == (False, 32, 1, 2, 8, 10, 0.1, 1e-5, 1.0, 256, 4.0)
    assert dit_config_from_diffusers({**BASE, "dropout": 0.1}, ignore_dropout=True).learn_sigma
    # the DiT-XL/2 config (diffusers' defaults, out_channels 8) is DiT-XL/2 with diffusers' two numerical knobs
    xl = dit_config_from_diffusers({"out_channels": 8})
    assert xl == DiTConfig.from_name("DiT-XL/2", timestep_freq_shift=1, mlp_norm_eps=1e-5)


@pytest.mark.parametrize("field, value", [
    ("timestep_freq_shift", 0.0), ("class_dropout_prob", 0.0), ("input_size", (8, 16)), ("mlp_ratio", 2.0),
    ("frequency_embedding_size", 128),
])
def test_fastdit_configs_diffusers_cannot_hold_raise_naming_the_field(field, value):
    config = DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3, timestep_freq_shift=1)
    with pytest.raises(ValueError, match=field):
        diffusers_config_from_dit(config.replace(**{field: value}))


def test_official_timestep_frequencies_convert_only_when_inexact_is_allowed(float64_timesteps):
    config = DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3)  # official: shift 0
    ours = DiT(config, backend="reference").double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    with pytest.raises(ValueError, match="timestep_freq_shift"):
        diffusers_from_dit(ours)
    theirs = diffusers_from_dit(ours, allow_inexact=True)
    x, t, y = inputs(batch=3)
    y = y.clamp(max=3)
    with torch.no_grad():
        differ = relative_error(theirs(x, t, y).sample, ours(x, t, y))
        same = relative_error(dit_from_diffusers(theirs)(x, t, y), theirs(x, t, y).sample)
    assert differ > 1e-6 and same < 1e-10


def test_other_class_dropout_prob_is_set_with_a_warning():
    config = DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=3, class_dropout_prob=0.25,
                       timestep_freq_shift=1)
    with pytest.warns(UserWarning, match="class_dropout_prob"):
        theirs = diffusers_from_dit(DiT(config))
    assert {b.norm1.emb.class_embedder.dropout_prob for b in theirs.transformer_blocks} == {0.25}


def test_fused_projections_are_refused():
    theirs = tiny_diffusers()
    theirs.transformer_blocks[1].attn1.fuse_projections()
    with pytest.raises(ValueError, match="to_qkv"):
        dit_from_diffusers(theirs)
