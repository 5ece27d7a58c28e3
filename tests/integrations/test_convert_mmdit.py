"""Converters between diffusers' SD3Transformer2DModel / FluxTransformer2DModel and fastdit's MMDiT, and the
MMDiT features they need (single-stream blocks, pooled vector, guidance embedding, Flux's RoPE, SD3's cropped
sin-cos table).

Tiny diffusers models are built from scratch with random weights (every tensor redrawn: nothing is trivially
zero) — nothing is downloaded. In float64, diffusers computes three things in float32 (the sinusoidal timestep
embedding, Flux's RoPE rotation, SD3's QK RMSNorm statistics; see the converter's docstring): the
``float64_diffusers`` fixture makes those float64 too, and outputs then agree to float64 rounding."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastdit.integrations.diffusers.convert_mmdit import (flux_config_from_mmdit, flux_from_mmdit, flux_image_ids,
                                                          flux_pack, flux_text_ids, flux_unpack,
                                                          mmdit_config_from_flux, mmdit_config_from_sd3,
                                                          mmdit_from_flux, mmdit_from_sd3, sd3_config_from_mmdit,
                                                          sd3_from_mmdit)
from fastdit.models import MMDiT, MMDiTConfig, mmdit_flops
from fastdit.models.mmdit import sincos_crop_table

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402

F64 = torch.float64
EXACT = 1e-10  # relative (to max |output|) in float64


@pytest.fixture
def float64_diffusers(monkeypatch):
    """diffusers' float32-only steps, in the input's dtype (float64 here); the math is unchanged."""
    import diffusers.models.embeddings as embeddings
    import diffusers.models.normalization as normalization
    import diffusers.models.transformers.transformer_flux as transformer_flux

    def timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                           max_period=10000):
        half = embedding_dim // 2
        dtype = F64 if timesteps.dtype == F64 else torch.float32
        exponent = -math.log(max_period) * torch.arange(half, dtype=dtype) / (half - downscale_freq_shift)
        emb = scale * timesteps[:, None].to(dtype) * torch.exp(exponent)[None]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb

    def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        assert use_real and use_real_unbind_dim == -1 and sequence_dim == 1  # Flux's call
        cos, sin = (f[None, :, None, :].to(x.dtype) for f in freqs_cis)
        real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return x * cos + torch.stack([-imag, real], dim=-1).flatten(3) * sin

    def rms_norm_forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return hidden_states * torch.rsqrt(variance + self.eps) * self.weight

    monkeypatch.setattr(embeddings, "get_timestep_embedding", timestep_embedding)
    monkeypatch.setattr(transformer_flux, "apply_rotary_emb", apply_rotary_emb)
    monkeypatch.setattr(normalization.RMSNorm, "forward", rms_norm_forward)


def randomize_(model, std=0.15):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and p.dim() == 1 else 0.0, std)
    return model


SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=12, caption_projection_dim=32, pooled_projection_dim=10, out_channels=4,
                pos_embed_max_size=6)
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(4, 6, 6))


def tiny_sd3(dtype=F64, **overrides):
    return randomize_(SD3Transformer2DModel(**{**SD3_TINY, **overrides})).to(dtype).eval()


def tiny_flux(dtype=F64, **overrides):
    return randomize_(FluxTransformer2DModel(**{**FLUX_TINY, **overrides})).to(dtype).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def sd3_inputs(B, H, W, L, dtype=F64, channels=4):
    return (torch.randn(B, channels, H, W, dtype=dtype), torch.rand(B, dtype=dtype) * 1000,
            torch.randn(B, L, 12, dtype=dtype), torch.randn(B, 10, dtype=dtype))


def run_sd3(model, x, t, ctx, pooled):
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample


def run_flux(model, x, t, ctx, pooled, guidance=None):
    H, W = x.shape[-2:]
    with torch.no_grad():
        out = model(hidden_states=flux_pack(x), encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                    img_ids=flux_image_ids(H, W, dtype=x.dtype), txt_ids=flux_text_ids(ctx.shape[1], dtype=x.dtype),
                    guidance=guidance).sample
    return flux_unpack(out, H, W)


def without_keys(state, keys):
    return {k: v for k, v in state.items() if k not in keys}


# ------------------------------------------------------------------------------------------------ SD3

@pytest.mark.parametrize("qk_norm,num_layers", [(None, 3), ("rms_norm", 3), ("rms_norm", 1)])
@pytest.mark.parametrize("height,width", [(8, 8), (12, 6), (2, 10)])
def test_sd3_output_equals_diffusers_in_float64(qk_norm, num_layers, height, width, float64_diffusers):
    theirs = tiny_sd3(qk_norm=qk_norm, num_layers=num_layers)
    ours = mmdit_from_sd3(theirs, backend="reference")
    assert ours.config.qk_norm == (qk_norm is not None) and ours.config.pos_embed == "sincos_crop"
    assert not ours.training and ours.x_embedder.proj.weight.dtype == F64
    x, t, ctx, pooled = sd3_inputs(2, height, width, 5)
    want = run_sd3(theirs, x, t, ctx, pooled)
    with torch.no_grad():
        got = ours(x, t, ctx, pooled=pooled)
    assert rel_err(got, want) < EXACT


def test_sd3_float32_agrees_without_any_patching():
    theirs = tiny_sd3(torch.float32, qk_norm="rms_norm")
    ours = mmdit_from_sd3(theirs, backend="reference")
    x, t, ctx, pooled = sd3_inputs(2, 8, 6, 5, torch.float32)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx, pooled=pooled), run_sd3(theirs, x, t, ctx, pooled)) < 1e-5


def test_sd3_caption_mask_equals_diffusers_on_the_truncated_caption(float64_diffusers):
    """SD3 attends to every token it gets; fastdit's context_mask leaves padding out: the same as diffusers
    given the real tokens only (lengths include the full caption)."""
    theirs = tiny_sd3(qk_norm="rms_norm")
    ours = mmdit_from_sd3(theirs, backend="reference")
    x, t, ctx, pooled = sd3_inputs(3, 6, 8, 5)
    lengths = torch.tensor([2, 5, 0])
    ctx[0, 2:] = float("nan")  # padding may hold anything
    with torch.no_grad():
        got = ours(x, t, ctx, lengths, pooled=pooled)
    for i, n in enumerate(lengths.tolist()):
        want = run_sd3(theirs, x[i:i + 1], t[i:i + 1], ctx[i:i + 1, :n], pooled[i:i + 1])
        assert rel_err(got[i:i + 1], want) < EXACT


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd3_round_trips_are_exact(qk_norm):
    theirs = tiny_sd3(qk_norm=qk_norm, out_channels=8)  # learned sigma
    ours = mmdit_from_sd3(theirs)
    assert ours.config.learn_sigma
    back = sd3_from_mmdit(ours)
    assert isinstance(back, SD3Transformer2DModel) and not back.training
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(theirs.config)
    # the last block's caption queries affect no output: fastdit drops them, the way back fills them
    last = f"transformer_blocks.{SD3_TINY['num_layers'] - 1}.attn."
    dropped = {last + "add_q_proj.weight", last + "add_q_proj.bias"} | (
        {last + "norm_added_q.weight"} if qk_norm else set())
    a, b = theirs.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for key in a:
        if key not in dropped:
            assert torch.equal(a[key], b[key]), key
    assert (b[last + "add_q_proj.weight"] == 0).all() and (b[last + "add_q_proj.bias"] == 0).all()
    # fastdit -> SD3 -> fastdit returns every tensor
    again = mmdit_from_sd3(back)
    assert again.config == ours.config
    s1, s2 = ours.state_dict(), again.state_dict()
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(again.pos_embed, ours.pos_embed)
    # the produced models load strictly into fresh ones
    MMDiT(ours.config).to(F64).load_state_dict(s1, strict=True)
    SD3Transformer2DModel(**sd3_config_from_mmdit(ours.config)).to(F64).load_state_dict(b, strict=True)


def test_converted_models_do_not_share_storage_with_their_source():
    theirs = tiny_sd3()
    ours = mmdit_from_sd3(theirs)
    with torch.no_grad():
        ours.context_embedder.weight.add_(1.0)
    assert not torch.equal(ours.context_embedder.weight, theirs.context_embedder.weight)


def test_sd3_position_table_is_diffusers_table_bitwise():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for dim, max_size, base in ((32, 6, 4), (64, 96, 64), (48, 24, 16)):
        want = get_2d_sincos_pos_embed(dim, max_size, base_size=base, interpolation_scale=1.0).float()
        assert torch.equal(sincos_crop_table(dim, max_size, base), want)
    # the crop: SD3's PatchEmbed output minus its projection is the centred window of the table
    theirs = tiny_sd3(torch.float32)
    ours = mmdit_from_sd3(theirs)
    x = torch.randn(1, 4, 6, 10)
    with torch.no_grad():
        table = theirs.pos_embed(x) - theirs.pos_embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours.pos_embed_for((3, 5)), table, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size 6"):
        ours(torch.randn(1, 4, 14, 4), torch.rand(1), torch.randn(1, 2, 12), pooled=torch.randn(1, 10))


# ----------------------------------------------------------------------------------------------- Flux

def flux_inputs(B, H, W, L, dtype=F64):
    return (torch.randn(B, 4, H, W, dtype=dtype), torch.rand(B, dtype=dtype), torch.randn(B, L, 12, dtype=dtype),
            torch.randn(B, 10, dtype=dtype), 1 + 4 * torch.rand(B, dtype=dtype))


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("height,width", [(8, 8), (6, 10)])
def test_flux_output_equals_diffusers_in_float64(guidance, height, width, float64_diffusers):
    theirs = tiny_flux(guidance_embeds=guidance)
    ours = mmdit_from_flux(theirs, backend="reference")
    cfg = ours.config
    assert (cfg.depth, cfg.single_depth, cfg.patch_size, cfg.in_channels, cfg.rope_axes_dims) == (2, 2, 2, 4, (4, 6, 6))
    x, t, ctx, pooled, g = flux_inputs(2, height, width, 5)
    want = run_flux(theirs, x, t, ctx, pooled, g if guidance else None)
    with torch.no_grad():
        got = ours(x, 1000 * t, ctx, pooled=pooled, guidance=1000 * g if guidance else None)
    assert rel_err(got, want) < EXACT


def test_flux_float32_agrees_without_any_patching():
    theirs = tiny_flux(torch.float32, guidance_embeds=True)
    ours = mmdit_from_flux(theirs, backend="reference")
    x, t, ctx, pooled, g = flux_inputs(2, 6, 8, 5, torch.float32)
    with torch.no_grad():
        got = ours(x, 1000 * t, ctx, pooled=pooled, guidance=1000 * g)
    assert rel_err(got, run_flux(theirs, x, t, ctx, pooled, g)) < 1e-5


def test_flux_caption_mask_equals_diffusers_on_the_truncated_caption(float64_diffusers):
    theirs = tiny_flux()
    ours = mmdit_from_flux(theirs, backend="reference")
    x, t, ctx, pooled, _ = flux_inputs(3, 4, 6, 4)
    lengths = torch.tensor([4, 0, 3])
    with torch.no_grad():
        got = ours(x, 1000 * t, ctx, lengths, pooled=pooled)
    for i, n in enumerate(lengths.tolist()):
        want = run_flux(theirs, x[i:i + 1], t[i:i + 1], ctx[i:i + 1, :n], pooled[i:i + 1])
        assert rel_err(got[i:i + 1], want) < EXACT


@pytest.mark.parametrize("guidance", [False, True])
def test_flux_round_trips_are_exact(guidance):
    theirs = tiny_flux(guidance_embeds=guidance, out_channels=32)  # learned sigma
    ours = mmdit_from_flux(theirs)
    assert ours.config.learn_sigma and ours.config.guidance_embed == guidance
    back = flux_from_mmdit(ours)
    assert isinstance(back, FluxTransformer2DModel)
    a, b = theirs.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = mmdit_from_flux(back)
    s1, s2 = ours.state_dict(), again.state_dict()
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    MMDiT(ours.config).to(F64).load_state_dict(s1, strict=True)
    FluxTransformer2DModel(**flux_config_from_mmdit(ours.config)).to(F64).load_state_dict(b, strict=True)


def test_flux_pack_helpers_are_the_pipelines():
    """flux_pack / flux_unpack / ids written as FluxPipeline's _pack_latents, _unpack_latents and
    _prepare_latent_image_ids do it (the pipeline module itself needs transformers)."""
    x = torch.randn(2, 16, 6, 10)
    B, C, H, W = x.shape
    want = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)
    assert torch.equal(flux_pack(x), want)
    assert torch.equal(flux_unpack(want, H, W), x)
    ids = torch.zeros(H // 2, W // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(H // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(W // 2)[None, :]
    assert torch.equal(flux_image_ids(H, W), ids.reshape(-1, 3))
    assert torch.equal(flux_text_ids(7), torch.zeros(7, 3))
    with pytest.raises(ValueError, match="not a multiple of 2"):
        flux_pack(torch.randn(1, 4, 5, 4))


def test_mmdit_rope_is_flux_rope():
    """fastdit's table for ids (0, row, col) is diffusers' FluxPosEmbed (cos, sin repeated per pair: the
    interleaved pairing)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ours = mmdit_from_flux(tiny_flux(torch.float32))
    table = ours.rope_table((3, 5), torch.device("cpu"))
    cos, sin = FluxPosEmbed(10000, [4, 6, 6])(flux_image_ids(6, 10))
    assert torch.equal(table[..., 0], cos[:, 0::2]) and torch.equal(table[..., 0], cos[:, 1::2])
    assert torch.equal(table[..., 1], sin[:, 0::2])


# --------------------------------------------------------------------------------------------- refusals

def test_unsupported_diffusers_configs_are_refused_by_name():
    base = dict(SD3Transformer2DModel(**SD3_TINY).config)
    cases = [({"dual_attention_layers": (0,)}, "dual_attention_layers"),
             ({"qk_norm": "layer_norm"}, "qk_norm='layer_norm'"), ({"pos_embed_max_size": None}, "pos_embed_max_size"),
             ({"caption_projection_dim": 16}, "caption_projection_dim"),
             ({"out_channels": 5}, "out_channels"), ({"some_new_field": 1}, "unknown field.*some_new_field")]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            mmdit_config_from_sd3({**base, **change})
    flux = dict(FluxTransformer2DModel(**FLUX_TINY).config)
    for change, match in [({"patch_size": 2}, "patch_size"), ({"in_channels": 18}, "in_channels"),
                          ({"axes_dims_rope": (4, 4, 4)}, "axes_dims_rope"), ({"out_channels": 20}, "out_channels")]:
        with pytest.raises(ValueError, match=match):
            mmdit_config_from_flux({**flux, **change})
    with pytest.raises(ValueError, match="expected a SD3Transformer2DModel config"):
        mmdit_config_from_sd3(3)


def test_models_with_extra_modules_are_refused():
    from peft import LoraConfig

    model = tiny_sd3(torch.float32)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="LoRA adapters or other extra modules"):
        mmdit_from_sd3(model)


def test_fastdit_models_without_a_diffusers_equivalent_are_refused_by_name():
    plain = MMDiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, caption_dim=12)
    with pytest.raises(ValueError, match="pooled_dim=None"):
        sd3_config_from_mmdit(plain)
    with pytest.raises(ValueError, match="pos_embed='rope'"):
        sd3_config_from_mmdit(plain.replace(pooled_dim=10))
    with pytest.raises(ValueError, match="rope_axes_dims=None"):
        flux_config_from_mmdit(plain.replace(pooled_dim=10))
    flux_like = plain.replace(pooled_dim=10, rope_axes_dims=(4, 6, 6), context_pre_only_last=False)
    flux_config_from_mmdit(flux_like)  # fine
    with pytest.raises(ValueError, match="context_pre_only_last=True"):
        flux_config_from_mmdit(flux_like.replace(context_pre_only_last=True))
    with pytest.raises(ValueError, match="mlp_ratio=2.0"):
        flux_config_from_mmdit(flux_like.replace(mlp_ratio=2.0))
    with pytest.raises(ValueError, match="expected a fastdit MMDiT"):
        sd3_from_mmdit(tiny_sd3())


# ------------------------------------------------------------------------------- MMDiT generalisation

FLUXLIKE = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, caption_dim=12,
                single_depth=2, context_pre_only_last=False, pooled_dim=10, guidance_embed=True,
                rope_axes_dims=(8, 12, 12))


def test_default_config_keeps_its_keys_and_new_ones_appear_only_when_asked():
    plain = MMDiT(MMDiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=2, caption_dim=12))
    keys = set(plain.state_dict())
    assert not any(k.startswith(("single_blocks", "guidance_embedder")) for k in keys)
    assert "blocks.1.attn.txt_kv.weight" in keys and plain.pooled_embedder.mlp[0].in_features == 12
    flux = MMDiT(MMDiTConfig(**FLUXLIKE))
    fkeys = set(flux.state_dict())
    assert {"single_blocks.1.linear1.weight", "guidance_embedder.mlp.2.bias"} <= fkeys
    assert "blocks.1.attn.txt_qkv.weight" in fkeys and flux.pooled_embedder.mlp[0].in_features == 10
    # a fresh model still outputs zeros (AdaLN-Zero in the single blocks too)
    out = flux(torch.randn(2, 4, 8, 6), torch.rand(2), torch.randn(2, 3, 12), pooled=torch.randn(2, 10),
               guidance=torch.tensor(3.0))
    assert torch.equal(out, torch.zeros_like(out))


def test_flux_like_mmdit_trains_a_step():
    model = randomize_(MMDiT(MMDiTConfig(**FLUXLIKE), backend="reference"), std=0.05)
    model.gradient_checkpointing = True
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, ctx = torch.randn(2, 4, 8, 6), torch.randn(2, 3, 12)
    loss = F.mse_loss(model(x, torch.rand(2) * 1000, ctx, torch.tensor([1, 3]), pooled=torch.randn(2, 10),
                            guidance=torch.full((2,), 3500.0)), torch.randn_like(x))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    before = model.single_blocks[0].linear1.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.single_blocks[0].linear1.weight)


def test_pooled_and_guidance_arguments_are_checked():
    model = MMDiT(MMDiTConfig(**FLUXLIKE), backend="reference")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match=r"pass pooled=\(B, 10\)"):
        model(x, t, ctx, guidance=t)
    with pytest.raises(ValueError, match=r"pooled must be a float tensor \(B, pooled_dim\) = \(2, 10\)"):
        model(x, t, ctx, pooled=torch.randn(2, 12), guidance=t)
    with pytest.raises(ValueError, match="guidance_embed=True"):
        model(x, t, ctx, pooled=torch.randn(2, 10))
    plain = MMDiT(MMDiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=2, caption_dim=12))
    with pytest.raises(ValueError, match="pooled given, but this model pools its caption tokens"):
        plain(x, t, ctx, pooled=torch.randn(2, 12))
    with pytest.raises(ValueError, match="no guidance embedding"):
        plain(x, t, ctx, guidance=t)


def test_bad_config_combinations_raise_clear_errors():
    base = dict(input_size=8, hidden_size=64, depth=2, num_heads=2, caption_dim=12)
    cases = [(dict(single_depth=1), "needs context_pre_only_last=False"),
             (dict(single_depth=-1), "single_depth must be an int >= 0"),
             (dict(pooled_dim=0), "pooled_dim must be None or a positive int"),
             (dict(guidance_embed=1), "guidance_embed must be a bool"),
             (dict(rope_axes_dims=(8, 12, 12), pos_embed="learned"), "rope_axes_dims is for pos_embed='rope'"),
             (dict(rope_axes_dims=(8, 8, 8)), r"must sum to the head dim 32"),
             (dict(rope_axes_dims=(3, 29)), "positive even ints"),
             (dict(pos_embed="sincos_crop"), "needs pos_embed_max_size"),
             (dict(pos_embed="sincos_crop", pos_embed_max_size=3), "exceeds pos_embed_max_size 3"),
             (dict(pos_embed_max_size=8), "pos_embed_max_size is for pos_embed='sincos_crop'")]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            MMDiTConfig(**{**base, **change})
    cfg = MMDiTConfig(**{**base, "rope_axes_dims": [8, 12, 12], "context_pre_only_last": False})
    assert cfg.rope_axes_dims == (8, 12, 12)
    assert MMDiTConfig.from_dict(cfg.to_dict()) == cfg  # JSON round trip (tuples come back as lists)
    for name in MMDiTConfig.names():  # the presets still validate
        MMDiTConfig.from_name(name)


def test_flop_count_of_single_stream_models_equals_the_measured_count():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = MMDiTConfig(**{**FLUXLIKE, "learn_sigma": True})
    model = MMDiT(cfg, backend="reference")
    batch, height, width, L = 2, 8, 12, 5
    args = (torch.randn(batch, 4, height, width), torch.rand(batch), torch.randn(batch, L, 12), torch.tensor([5, 2]))
    kwargs = dict(pooled=torch.randn(batch, 10), guidance=torch.rand(batch))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    assert counter.get_total_flops() == batch * model.flops_per_sample(height, width, caption_len=L)
    assert model.flops_per_sample(height, width, caption_len=L) == mmdit_flops(cfg, height, width, caption_len=L)
    parts = model.flop_breakdown(height, width, caption_len=L)
    assert parts["single_blocks"] > 0 and parts["guidance_embedder"] > 0


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_new_model_kinds_trace_without_graph_breaks(kind):
    torch._dynamo.reset()
    if kind == "flux":
        model = MMDiT(MMDiTConfig(**FLUXLIKE), backend="reference")
        kwargs = dict(pooled=torch.randn(2, 10), guidance=torch.rand(2))
    else:
        model = mmdit_from_sd3(tiny_sd3(torch.float32, qk_norm="rms_norm"), backend="reference")
        kwargs = dict(pooled=torch.randn(2, 10))
    explained = torch._dynamo.explain(model)(torch.randn(2, 4, 8, 6), torch.rand(2), torch.randn(2, 5, 12),
                                             torch.tensor([2, 5]), **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


def test_converted_flux_on_the_fast_path_matches_the_reference_path():
    """The Triton kernels (interpreter on CPU) through a whole converted Flux model: head dim 64."""
    theirs = tiny_flux(torch.float32, num_layers=1, num_single_layers=1, attention_head_dim=64,
                       num_attention_heads=1, axes_dims_rope=(16, 24, 24))
    fast, ref = (mmdit_from_flux(theirs, backend=b) for b in ("triton", "reference"))
    x, t, ctx, pooled, _ = flux_inputs(2, 4, 6, 3, torch.float32)
    lengths = torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, 1000 * t, ctx, lengths, pooled=pooled),
                                   ref(x, 1000 * t, ctx, lengths, pooled=pooled), rtol=1e-4, atol=1e-4)
