"""MMDiT: matches an independent stock SD3-style forward (float64, RoPE and learned positions, padded
captions); padded caption tokens cannot change the output; a caption with no real tokens is finite;
every parameter trains; gradient checkpointing; shapes at several sizes; errors; backend switch;
no graph breaks under torch.compile; the named presets."""
import pytest
import torch

from fastdit.models import MMDiT, MMDiTConfig, create_model, trim_caption_padding
from fastdit.modules import JointAttention, ModulatedLayerNorm, RMSNorm, set_module_backend
from fastdit.ops import rope_freqs_2d

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=2, caption_dim=24)


def small_mmdit(backend="reference", **overrides):
    return MMDiT(MMDiTConfig(**{**SMALL, **overrides}), backend=backend)


def random_mmdit(ref, dtype=torch.float32, **overrides):
    return ref.randomize_(small_mmdit(**overrides)).to(dtype)


def inputs(batch, height, width, caption_len, dtype=torch.float32, caption_dim=24, channels=4):
    return (torch.randn(batch, channels, height, width, dtype=dtype), torch.rand(batch, dtype=dtype) * 1000,
            torch.randn(batch, caption_len, caption_dim, dtype=dtype))


# ----------------------------------------------------------------------------- against a stock MMDiT

@pytest.mark.parametrize("pos_embed,height,width", [("rope", 8, 12), ("learned", 8, 8)])
def test_matches_a_stock_mmdit_in_float64(pos_embed, height, width, ref):
    cfg = {**SMALL, "pos_embed": pos_embed, "learn_sigma": True}
    stock = ref.randomize_(ref.StockMMDiT(**cfg)).double()
    ours = MMDiT(MMDiTConfig(**cfg), backend="reference").double()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    ours.load_state_dict(stock.state_dict(), strict=True)
    x, t, ctx = inputs(3, height, width, 6, torch.float64)
    lengths = torch.tensor([6, 2, 0])  # full, padded, and no real caption token
    with torch.no_grad():
        out = ours(x, t, ctx, lengths)
        expected = stock(x, t, ctx, lengths)
    assert out.shape == (3, 8, height, width) and expected.abs().max() > 0.1
    # float64 agreement to rounding (randomised blocks amplify: ~1e-14 of the largest activations)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_rope_table_is_2d_axial_over_the_patch_grid(ref):
    model = small_mmdit()
    table = model.rope_table((4, 6), torch.device("cpu"))
    assert table.dtype == torch.float32
    torch.testing.assert_close(table, ref.axial_rope_table(4, 6, 32).float())
    assert model.rope_table((4, 6), torch.device("cpu")) is table  # cached
    assert not hasattr(model, "pos_embed")


def test_learned_positions_at_other_sizes_are_the_resized_table(ref):
    model = random_mmdit(ref, pos_embed="learned")
    assert model.pos_embed.shape == (1, 16, 64) and model.pos_embed_for((4, 4)) is model.pos_embed
    resized = model.pos_embed_for((2, 6))
    assert resized.shape == (1, 12, 64)
    x, t, ctx = inputs(2, 4, 12, 3)
    model(x, t, ctx).square().sum().backward()  # other sizes train the same table
    assert model.pos_embed.grad.abs().sum() > 0


def test_fresh_learned_table_starts_from_sin_cos(ref):
    model = small_mmdit(pos_embed="learned")
    expected = torch.from_numpy(ref.official_2d_sincos(64, 4, 4)).float().unsqueeze(0)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- caption padding

def test_padded_caption_tokens_do_not_change_the_output(ref):
    model = random_mmdit(ref, torch.float64).eval()
    x, t, ctx = inputs(3, 8, 8, 7, torch.float64)
    lengths = torch.tensor([3, 7, 1])
    out = model(x, t, ctx, lengths)
    garbage = ctx.clone()
    pad = torch.arange(7) >= lengths[:, None]
    garbage[pad] = torch.randn(int(pad.sum()), 24, dtype=torch.float64) * 100
    garbage[0, 5, 0], garbage[2, 6, 3] = float("nan"), float("inf")
    torch.testing.assert_close(model(x, t, garbage, lengths), out, rtol=0, atol=0)
    # a bool mask means the same as lengths
    torch.testing.assert_close(model(x, t, garbage, ~pad), out, rtol=0, atol=0)
    # and a padded caption gives what the unpadded caption gives
    for i, n in enumerate(lengths.tolist()):
        alone = model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1, :n])
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-10, atol=1e-10)
    # the padding would matter if it were not masked (the test can fail)
    assert not torch.allclose(model(x, t, torch.nan_to_num(garbage, posinf=9.0)), out)


def test_a_caption_with_no_real_tokens_gives_finite_output_and_gradients(ref):
    model = random_mmdit(ref)
    x, t, ctx = inputs(2, 8, 8, 5)
    ctx.requires_grad_()
    lengths = torch.tensor([0, 4])
    out = model(x, t, ctx, lengths)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert not ctx.grad[0].any()  # the empty caption contributes nothing
    # its output does not depend on the caption contents at all
    other = ctx.detach().clone()
    other[0] = torch.randn(5, 24)
    torch.testing.assert_close(model(x, t, other, lengths)[0], out[0].detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- initialisation, training

@pytest.mark.parametrize("pos_embed", ["rope", "learned"])
def test_fresh_model_outputs_zeros(pos_embed):
    model = small_mmdit(pos_embed=pos_embed, learn_sigma=True)
    out = model(*inputs(2, 8, 12, 5), torch.tensor([5, 2]))
    assert out.shape == (2, 8, 8, 12) and torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:
        for modulation in (block.adaLN_modulation, block.txt_adaLN_modulation):
            assert not modulation[1].weight.any() and not modulation[1].bias.any()
    assert 0.015 < model.pooled_embedder.mlp[0].weight.std() < 0.025


@pytest.mark.parametrize("pos_embed", ["rope", "learned"])
def test_gradients_reach_every_parameter(pos_embed, ref):
    model = random_mmdit(ref, pos_embed=pos_embed)
    model(*inputs(2, 8, 8, 5), torch.tensor([5, 2])).square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_last_block_is_context_pre_only(ref):
    """Nothing reads the caption stream after the last block, so it has no caption output weights
    (every parameter trains; DDP needs no find_unused_parameters)."""
    model = small_mmdit()
    last = dict(model.blocks[-1].named_parameters())
    assert "attn.txt_kv.weight" in last and "attn.txt_k_norm.weight" in last
    assert not any(name.startswith(("txt_mlp", "attn.txt_proj", "attn.txt_qkv", "attn.txt_q_norm")) for name in last)
    assert last["txt_adaLN_modulation.1.weight"].shape == (2 * 64, 64)


def test_gradient_checkpointing_gives_the_same_gradients(ref):
    model = random_mmdit(ref)
    x, t, ctx = inputs(2, 8, 12, 5)
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(x, t, ctx, torch.tensor([3, 5])).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("name,pos_embed,learn_sigma", [("MMDiT-Tiny/2", "rope", False),
                                                        ("MMDiT-S/4", "learned", True),
                                                        ("MMDiT-B/2", "rope", True)])
def test_shapes_for_presets_non_square_and_two_resolutions(name, pos_embed, learn_sigma):
    model = create_model(name, depth=2, caption_dim=16, pos_embed=pos_embed, learn_sigma=learn_sigma, input_size=16,
                         backend="reference")
    p = model.config.patch_size
    for height, width in ((16, 16), (2 * p, 3 * p), (32, 16)):
        x, t, ctx = inputs(2, height, width, 4, caption_dim=16)
        with torch.no_grad():
            out = model(x, t, ctx, torch.tensor([4, 1]))
        assert out.shape == (2, 8 if learn_sigma else 4, height, width)


# ----------------------------------------------------------------------------- errors, presets

def test_bad_inputs_raise_clear_errors():
    model = small_mmdit()
    x, t, ctx = inputs(2, 8, 8, 5)
    with pytest.raises(ValueError, match="3 channels.*in_channels=4"):
        model(torch.randn(2, 3, 8, 8), t, ctx)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(torch.randn(2, 4, 9, 8), t, ctx)
    with pytest.raises(ValueError, match=r"context must be \(B, L, caption_dim\) = \(2, L >= 1, 24\)"):
        model(x, t, torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="caption tokens"):
        model(x, t, torch.randn(2, 24))
    with pytest.raises(ValueError, match="bool .* or integer lengths"):
        model(x, t, ctx, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        model(x, t, ctx, torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"bool context_mask must be \(B, L\)"):
        model(x, t, ctx, torch.ones(2, 4, dtype=torch.bool))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="valid names: MMDiT-Tiny/2.*MMDiT-S/2"):
        MMDiTConfig.from_name("MMDiT-Huge/2")
    with pytest.raises(ValueError, match="pos_embed must be one of rope, learned"):
        MMDiTConfig(pos_embed="sincos")
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        MMDiTConfig(hidden_size=60, num_heads=2)
    MMDiTConfig(hidden_size=60, num_heads=2, pos_embed="learned")  # no RoPE, no constraint on the head dim


def test_presets():
    tiny = MMDiTConfig.from_name("MMDiT-Tiny/2")
    assert (tiny.depth, tiny.hidden_size, tiny.num_heads, tiny.patch_size) == (2, 128, 2, 2)
    for size, (depth, hidden, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                         "XL": (28, 1152, 16)}.items():
        cfg = MMDiTConfig.from_name(f"MMDiT-{size}/2")
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (depth, hidden, heads)
        assert cfg.qk_norm and cfg.pos_embed == "rope"
    assert isinstance(create_model("MMDiT-Tiny/4", caption_dim=8), MMDiT)


# ----------------------------------------------------------------------------- backends, compile

def test_set_module_backend_reaches_every_fastdit_module():
    model = small_mmdit(backend="reference")
    set_module_backend(model, "triton")
    fastdit_modules = [m for m in model.modules() if isinstance(m, (ModulatedLayerNorm, RMSNorm, JointAttention))]
    assert len(fastdit_modules) > 3 * SMALL["depth"]
    assert {m.backend for m in fastdit_modules} == {"triton"}
    assert model.blocks[-1].attn.backend == "triton"  # the context-pre-only attention too


def test_triton_backend_matches_reference(ref, device):
    """The fast path, tiny (Triton's interpreter on CPU is slow): head dim 64 (the attention op's)."""
    cfg = dict(hidden_size=64, num_heads=1, depth=2, input_size=4)
    reference = random_mmdit(ref, **cfg).to(device)
    fast = small_mmdit(backend="triton", **cfg).to(device)
    fast.load_state_dict(reference.state_dict())
    x, t, ctx = (v.to(device) for v in inputs(2, 4, 6, 3))
    lengths = torch.tensor([1, 3], device=device)
    torch.testing.assert_close(fast(x, t, ctx, lengths), reference(x, t, ctx, lengths), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pos_embed", ["rope", "learned"])
def test_whole_model_traces_without_graph_breaks(pos_embed):
    torch._dynamo.reset()
    model = small_mmdit(pos_embed=pos_embed)
    x, t, ctx = inputs(2, 8, 12, 5)
    explained = torch._dynamo.explain(model)(x, t, ctx, torch.tensor([2, 5]))
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


def test_rope_tables_reach_the_blocks(monkeypatch):
    """The image tokens' RoPE table is the 2-D axial one for the input's patch grid (non-square here)."""
    model = small_mmdit()
    seen = []
    for block in model.blocks:
        original = block.forward

        def spy(*args, _original=original):
            seen.append(args[4])
            return _original(*args)
        monkeypatch.setattr(block, "forward", spy)
    model(*inputs(1, 6, 10, 2))
    assert len(seen) == SMALL["depth"]
    for table in seen:
        torch.testing.assert_close(table, rope_freqs_2d(3, 5, 32))


# ----------------------------------------------------------------------------- caption padding trimmed

@pytest.mark.parametrize("lengths,L,multiple,keep", [([3, 7, 1], 40, 16, 16), ([17, 2], 40, 16, 32),
                                                     ([40, 0], 40, 16, 40), ([0, 0], 40, 16, 1),
                                                     ([5], 512, 16, 16), ([77], 512, 16, 80), ([3, 9], 12, 8, 12),
                                                     ([3, 9], 20, 1, 9)])
def test_trim_caption_padding_keeps_one_past_the_last_real_position(lengths, L, multiple, keep):
    mask = torch.arange(L) < torch.tensor(lengths)[:, None]
    ctx = torch.randn(len(lengths), L, 5)
    got, got_mask = trim_caption_padding(ctx, mask, multiple)
    assert got.shape == (len(lengths), keep, 5) and got_mask.shape == (len(lengths), keep)
    assert torch.equal(got, ctx[:, :keep]) and torch.equal(got_mask, mask[:, :keep])
    assert not mask[:, keep:].any()  # only padding was dropped


def test_trim_caption_padding_with_holes_and_without_a_mask():
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, [0, 2, 35]] = True  # not a prefix: the last real position decides
    ctx = torch.randn(2, 64, 3)
    assert trim_caption_padding(ctx, mask)[0].shape[1] == 48
    same, none = trim_caption_padding(ctx, None)
    assert same is ctx and none is None


@pytest.mark.parametrize("pos_embed", ["rope", "learned"])
def test_trimmed_captions_give_the_untrimmed_output_and_gradients(ref, pos_embed):
    """A 40-token buffer whose longest caption has 7 real tokens runs the blocks on 16 caption positions,
    with the same output and parameter / input gradients as the whole buffer (float64: rounding only)."""
    model = random_mmdit(ref, torch.float64, pos_embed=pos_embed).eval()
    x, t, ctx = inputs(3, 8, 8, 40, torch.float64)
    lengths = torch.tensor([3, 7, 1])
    seen = []  # the caption length each block is given
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[1].shape[1]))
    results = []
    for trim in (True, False):
        model.trim_caption_padding = trim
        model.zero_grad()
        c = ctx.clone().requires_grad_()
        out = model(x, t, c, lengths)
        out.square().sum().backward()
        results.append((out.detach(), c.grad, [p.grad.clone() for p in model.parameters()]))
    assert seen == [16] * 3 + [40] * 3
    (out, dctx, grads), (out_full, dctx_full, grads_full) = results
    torch.testing.assert_close(out, out_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dctx, dctx_full, rtol=1e-12, atol=1e-12)
    assert not dctx[:, 16:].any()
    for g, g_full in zip(grads, grads_full):
        torch.testing.assert_close(g, g_full, rtol=1e-10, atol=1e-12)


def test_trim_conditioning_cuts_what_cond_and_uncond_both_pad():
    model = small_mmdit()
    ctx = torch.randn(3, 48, 24)
    cond = {"context": ctx, "context_mask": torch.tensor([5, 20, 0]), "other": 7}
    uncond = {"context": torch.zeros(1, 48, 24), "context_mask": torch.zeros(1, 48, dtype=torch.bool)}
    c, u = model.trim_conditioning(cond, uncond)
    assert c["context"].shape == (3, 32, 24) and u["context"].shape == (1, 32, 24) and c["other"] == 7
    assert torch.equal(c["context"], ctx[:, :32]) and c["context_mask"].dtype == torch.bool
    assert c["context_mask"].sum(1).tolist() == [5, 20, 0] and not u["context_mask"].any()
    assert model.trim_conditioning(cond, None)[0]["context"].shape[1] == 32  # unguided: cond alone
    # an unconditional caption with more real tokens keeps them
    long_uncond = {**uncond, "context_mask": torch.tensor([40])}
    assert model.trim_conditioning(cond, long_uncond)[0]["context"].shape[1] == 48
    # without a mask (all real), or without captions, nothing changes
    for pair in [({"context": ctx}, uncond), (cond, {"context": torch.zeros(1, 48, 24)}), ({"y": 1}, None)]:
        got = model.trim_conditioning(*pair)
        assert got[0] is pair[0] and got[1] is pair[1]


def test_samplers_trim_the_captions_once_and_sample_the_same(ref):
    """sample() hands the model its conditioning with the shared padding cut (every step sees 16 caption
    positions, not the 40 of the buffer), and the samples equal those from the whole buffer (float32: the
    attention sums over fewer masked keys, so only rounding differs)."""
    from fastdit.diffusion import sample

    model = random_mmdit(ref).eval()
    ctx = torch.randn(2, 40, 24)
    cond = {"context": ctx, "context_mask": torch.tensor([3, 9])}
    uncond = {"context": torch.zeros_like(ctx[:1]), "context_mask": torch.tensor([0])}
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["context"].shape[1]),
                                    with_kwargs=True)
    run = dict(cfg_scale=3.0, steps=4, seed=0, progress=False)
    trimmed = sample(model, (2, 4, 8, 8), cond, uncond, **run)
    assert set(seen) == {16}
    model.trim_conditioning = lambda c, u: (c, u)  # the whole buffer at every step
    model.trim_caption_padding = False
    seen.clear()
    whole = sample(model, (2, 4, 8, 8), cond, uncond, **run)
    assert set(seen) == {40}
    torch.testing.assert_close(trimmed, whole, rtol=1e-5, atol=1e-5)  # float32: summation order only
