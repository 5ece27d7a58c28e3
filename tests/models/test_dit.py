"""DiT: the official checkpoint layout loads strictly and computes what the official forward does
(float64), at the configured size and at others (non-square too); official initialisation (a fresh
model outputs 0); label dropout and the null class; input errors; gradient checkpointing; backend
switch; no graph breaks under torch.compile; the named presets."""
import json
import math

import pytest
import torch

from fastdit.models import DiT, DiTConfig, create_model
from fastdit.models.layers import sincos_2d
from fastdit.modules import ModulatedLayerNorm, set_module_backend

SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def small_dit(backend="reference", **overrides):
    return DiT(DiTConfig(**{**SMALL, **overrides}), backend=backend)


def official_pair(ref, dtype=torch.float64, **overrides):
    """(ours, official) with the official model's random weights loaded strictly into ours."""
    cfg = {**SMALL, "class_dropout_prob": 0.1, "learn_sigma": True, **overrides}
    official = ref.randomize_(ref.OfficialDiT(**cfg)).to(dtype).eval()
    ours = DiT(DiTConfig(**cfg), backend="reference").to(dtype).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return ours, official


def inputs(batch, channels, height, width, num_classes, dtype=torch.float32):
    x = torch.randn(batch, channels, height, width, dtype=dtype)
    t = torch.rand(batch, dtype=dtype) * 999  # fractional timesteps, as rectified flow gives them
    y = torch.randint(0, num_classes, (batch,))
    return x, t, y


# ------------------------------------------------------------------------------ official layout

def test_state_dict_is_the_official_layout(ref):
    ours = DiT(DiTConfig(**SMALL, learn_sigma=True, class_dropout_prob=0.1))
    official = ref.OfficialDiT(**SMALL, learn_sigma=True, class_dropout_prob=0.1)
    ours_sd, official_sd = ours.state_dict(), official.state_dict()
    assert list(ours_sd) == list(official_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in official_sd.items()}
    D, N = SMALL["hidden_size"], (SMALL["input_size"] // 2) ** 2
    assert ours_sd["pos_embed"].shape == (1, N, D)
    assert ours_sd["y_embedder.embedding_table.weight"].shape == (SMALL["num_classes"] + 1, D)  # + null row
    assert ours_sd["final_layer.linear.weight"].shape == (2 * 2 * 2 * SMALL["in_channels"], D)  # learned sigma
    assert ours_sd["blocks.1.adaLN_modulation.1.weight"].shape == (6 * D, D)
    assert {"x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "blocks.0.attn.qkv.weight",
            "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
            "final_layer.adaLN_modulation.1.weight"} <= set(ours_sd)
    # the fixed position table is state, not a trainable parameter
    assert "pos_embed" not in dict(ours.named_parameters())


def test_no_null_row_without_label_dropout(ref):
    ours = DiT(DiTConfig(**SMALL, class_dropout_prob=0.0))
    assert ours.y_embedder.embedding_table.weight.shape[0] == SMALL["num_classes"]
    assert ours.null_class is None and small_dit().null_class == SMALL["num_classes"]
    ours.load_state_dict(ref.OfficialDiT(**SMALL, class_dropout_prob=0.0).state_dict(), strict=True)


def test_position_table_is_the_official_sin_cos(ref):
    ours = DiT(DiTConfig(**{**SMALL, "input_size": 16}))
    expected = torch.from_numpy(ref.official_2d_sincos(64, 8, 8)).float().unsqueeze(0)
    torch.testing.assert_close(ours.pos_embed, expected, rtol=0, atol=1e-6)
    # non-square grids extend it (columns in the first half of the channels, rows in the second)
    torch.testing.assert_close(sincos_2d(64, 3, 5), torch.from_numpy(ref.official_2d_sincos(64, 3, 5)),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.pos_embed_for((3, 5)), sincos_2d(64, 3, 5).float().unsqueeze(0))


@pytest.mark.parametrize("learn_sigma,dropout", [(True, 0.1), (False, 0.0)])
def test_matches_the_official_forward_in_float64(learn_sigma, dropout, ref):
    ours, official = official_pair(ref, learn_sigma=learn_sigma, class_dropout_prob=dropout)
    x, t, y = inputs(3, 3, 8, 8, SMALL["num_classes"], torch.float64)
    if dropout:
        y[0] = SMALL["num_classes"]  # the null class is a valid label
    out = ours(x, t, y)
    assert out.shape == (3, 3 * (2 if learn_sigma else 1), 8, 8)
    expected = official(x, t, y)
    assert expected.abs().max() > 0.1  # the comparison means something
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_force_drop_ids_match_the_official_forward(ref):
    ours, official = official_pair(ref)
    x, t, y = inputs(4, 3, 8, 8, SMALL["num_classes"], torch.float64)
    drop = torch.tensor([1, 0, 1, 0])
    torch.testing.assert_close(ours(x, t, y, force_drop_ids=drop), official(x, t, y, force_drop_ids=drop),
                               rtol=1e-10, atol=1e-10)
    # bool ids mean the same
    torch.testing.assert_close(ours(x, t, y, force_drop_ids=drop.bool()), ours(x, t, y, force_drop_ids=drop))


@pytest.mark.parametrize("height,width", [(8, 12), (16, 16), (6, 4)])
def test_other_sizes_match_the_official_forward_with_their_tables(height, width, ref):
    ours, official = official_pair(ref)
    x, t, y = inputs(2, 3, height, width, SMALL["num_classes"], torch.float64)
    torch.testing.assert_close(ours(x, t, y), official(x, t, y), rtol=1e-10, atol=1e-10)


def test_integer_timesteps_and_a_scalar_timestep(ref):
    ours, official = official_pair(ref)
    x, _, y = inputs(2, 3, 8, 8, SMALL["num_classes"], torch.float64)
    t = torch.tensor([17, 17])
    torch.testing.assert_close(ours(x, t, y), official(x, t, y), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x, torch.tensor(17.0, dtype=torch.float64), y), ours(x, t, y))


def test_diffusers_numerics_fields_default_to_the_official_and_reach_the_layers(ref):
    # defaults: the official model (its state dict loads strictly and its outputs are matched above)
    cfg = DiTConfig()
    assert (cfg.timestep_freq_shift, cfg.mlp_norm_eps) == (0.0, 1e-6)
    ours, official = official_pair(ref, dtype=torch.float32)
    assert ours.t_embedder.freq_shift == 0.0 and {b.norm2.eps for b in ours.blocks} == {1e-6}
    # diffusers' values: same keys and shapes, shifted frequencies, MLP-side eps only
    knobs = small_dit(class_dropout_prob=0.1, learn_sigma=True, timestep_freq_shift=1, mlp_norm_eps=1e-5).double()
    assert {k: v.shape for k, v in knobs.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}
    assert {b.norm2.eps for b in knobs.blocks} == {1e-5} and {b.norm1.eps for b in knobs.blocks} == {1e-6}
    assert knobs.final_layer.norm_final.eps == 1e-6
    t = torch.tensor([0.0, 3.5, 999.0], dtype=torch.float64)
    k = torch.arange(128, dtype=torch.float64)
    angles = t[:, None] * torch.exp(-math.log(10000) * k / 127)
    expected = knobs.t_embedder.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))
    torch.testing.assert_close(knobs.t_embedder(t), expected, rtol=1e-12, atol=1e-12)
    # the fields change the outputs of the same weights
    plain = small_dit(class_dropout_prob=0.1, learn_sigma=True).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.1)
    x, t, y = inputs(2, 3, 8, 8, SMALL["num_classes"], torch.float64)
    for field, value in (("timestep_freq_shift", 1.0), ("mlp_norm_eps", 1e-2)):
        other = small_dit(class_dropout_prob=0.1, learn_sigma=True, **{field: value}).double()
        other.load_state_dict(plain.state_dict(), strict=True)
        assert not torch.allclose(other(x, t, y), plain(x, t, y), rtol=1e-6, atol=0)
    # configs saved before the fields existed load with the defaults
    new_fields = ("timestep_freq_shift", "mlp_norm_eps")
    old = {k: v for k, v in DiTConfig(input_size=16).to_dict().items() if k not in new_fields}
    assert DiTConfig.from_dict(old) == DiTConfig(input_size=16)
    for bad in (dict(timestep_freq_shift=128), dict(timestep_freq_shift=float("nan")), dict(timestep_freq_shift=True),
                dict(mlp_norm_eps=0.0), dict(mlp_norm_eps=-1e-6)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DiTConfig(**bad)


# ------------------------------------------------------------------------------ initialisation

def test_fresh_model_outputs_zeros_and_has_the_official_init():
    model = small_dit(hidden_size=128, depth=3, learn_sigma=True)
    x, t, y = inputs(2, 3, 8, 12, SMALL["num_classes"])
    out = model(x, t, y)
    assert out.shape == (2, 6, 8, 12)
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
    for p in (model.final_layer.adaLN_modulation[1].weight, model.final_layer.linear.weight,
              model.final_layer.linear.bias):
        assert not p.any()
    # xavier-uniform: values within the bound and spread over it
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert not model.blocks[0].attn.qkv.bias.any()
    proj = model.x_embedder.proj.weight  # like a Linear on (D, C·p·p)
    bound = math.sqrt(6 / (proj.shape[0] + proj[0].numel()))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.9 * bound
    for p in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert 0.015 < p.std() < 0.025


# ------------------------------------------------------------------------------ labels

def test_label_dropout_in_training_only():
    model = small_dit(class_dropout_prob=0.5)
    emb = model.y_embedder
    labels = torch.randint(0, 10, (4000,))
    null_row = emb.embedding_table.weight[10]
    dropped = (emb(labels, train=True) == null_row).all(-1)
    assert 0.45 < dropped.float().mean() < 0.55
    assert not (emb(labels, train=False) == null_row).all(-1).any()


def test_training_forward_drops_labels_to_the_null_class():
    model = small_dit(class_dropout_prob=0.5)
    for p in model.parameters():  # a fresh model outputs 0 whatever the label
        p.data.normal_(0, 0.1)
    x, t, y = inputs(64, 3, 8, 8, 10)
    model.eval()
    with torch.no_grad():
        labelled, null = model(x, t, y), model(x, t, torch.full_like(y, 10))
        model.train()
        out = model(x, t, y)
    is_null = (out - null).flatten(1).abs().amax(1) < 1e-6
    is_labelled = (out - labelled).flatten(1).abs().amax(1) < 1e-6
    assert bool((is_null ^ is_labelled).all())  # each sample got its label or the null class
    assert 10 < int(is_null.sum()) < 54


def test_force_drop_ids_work_in_eval_mode():
    model = small_dit()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    model.eval()
    x, t, y = inputs(3, 3, 8, 8, 10)
    out = model(x, t, y, force_drop_ids=torch.tensor([0, 1, 0]))
    expected = model(x, t, torch.tensor([y[0], 10, y[2]]))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out[1], model(x, t, y)[1])


# ------------------------------------------------------------------------------ errors

def test_bad_inputs_raise_clear_errors():
    model = small_dit()
    x, t, y = inputs(2, 3, 8, 8, 10)
    with pytest.raises(ValueError, match="4 channels.*in_channels=3"):
        model(torch.randn(2, 4, 8, 8), t, y)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(torch.randn(2, 3, 8, 7), t, y)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 8, 8), t, y)
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, t, y > 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        model(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"labels y must be \(B,\)"):
        model(x, t, y[:1])
    with pytest.raises(ValueError, match=r"t must be \(B,\)"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="needs the null class"):
        small_dit(class_dropout_prob=0.0)(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        small_dit(class_dropout_prob=0.0)(x, t, torch.tensor([10, 0]))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="valid names: DiT-S/2, DiT-S/4.*DiT-XL/8"):
        DiTConfig.from_name("DiT-M/2")
    with pytest.raises(ValueError, match="unknown field.*hidden"):
        DiTConfig.from_name("DiT-S/2", hidden=12)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiTConfig(input_size=(32, 30), patch_size=4)
    with pytest.raises(ValueError, match="valid names"):
        create_model("MMDiT-XXL/2")


# ------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("size,depth,hidden,heads", [("S", 12, 384, 6), ("B", 12, 768, 12), ("L", 24, 1024, 16),
                                                     ("XL", 28, 1152, 16)])
def test_presets_are_the_papers(size, depth, hidden, heads):
    for p in (2, 4, 8):
        cfg = DiTConfig.from_name(f"DiT-{size}/{p}")
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, p)
        assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma) == (32, 4, 1000, True)
        assert cfg.class_dropout_prob == 0.1 and cfg.mlp_ratio == 4.0


def test_config_round_trips_through_json():
    cfg = DiTConfig.from_name("DiT-B/4", input_size=(32, 48), learn_sigma=False)
    again = DiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.input_size == (32, 48) and again.grid_size == (8, 12)


@pytest.mark.parametrize("name,learn_sigma", [("DiT-S/2", True), ("DiT-B/4", False), ("DiT-XL/8", True)])
def test_shapes_for_presets_non_square_and_two_resolutions(name, learn_sigma):
    # preset widths and heads (the attention shapes that matter), shallow and few classes to stay fast
    model = create_model(name, depth=1, num_classes=5, learn_sigma=learn_sigma, input_size=16, backend="reference")
    p = model.config.patch_size
    for height, width in ((16, 16), (2 * p, 3 * p), (32, 16)):
        x, t, y = inputs(2, 4, height, width, 5)
        with torch.no_grad():
            out = model(x, t, y)
        assert out.shape == (2, 8 if learn_sigma else 4, height, width)


# ------------------------------------------------------------------------------ training helpers

def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = small_dit(depth=3)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y = inputs(2, 3, 8, 12, 10)
    model.eval()  # no label dropout: both runs see the same labels
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(x, t, y).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)
    assert all(g.abs().sum() > 0 for g in grads[0].values())


def test_set_module_backend_reaches_every_fastdit_module():
    model = small_dit(backend="reference")
    set_module_backend(model, "triton")
    assert model.final_layer.norm_final.backend == "triton"
    backends = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert backends == {"triton"}
    assert sum(isinstance(m, ModulatedLayerNorm) for m in model.modules()) == 2 * SMALL["depth"] + 1


def test_triton_backend_matches_reference(device):
    """The fast path, tiny (the Triton interpreter on CPU is slow): head dim 64, float32."""
    ref_model = small_dit(hidden_size=64, num_heads=1, depth=1, input_size=4)
    for p in ref_model.parameters():
        p.data.normal_(0, 0.1)
    fast = small_dit(backend="triton", hidden_size=64, num_heads=1, depth=1, input_size=4)
    fast.load_state_dict(ref_model.state_dict())
    ref_model, fast = ref_model.to(device).eval(), fast.to(device).eval()
    x, t, y = (v.to(device) for v in inputs(2, 3, 4, 6, 10))
    torch.testing.assert_close(fast(x, t, y), ref_model(x, t, y), rtol=1e-4, atol=1e-5)


def test_whole_model_traces_without_graph_breaks():
    torch._dynamo.reset()
    model = small_dit()
    model.train()  # label dropout included
    x, t, y = inputs(2, 3, 8, 12, 10)
    explained = torch._dynamo.explain(model)(x, t, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
