import pytest
import torch

from fastdit.diffusion import DDPM, GuidedDenoiser, sample

NULL = 10  # the null class of a 10-class model


class ChannelModel:
    """Conditional and unconditional outputs differ only in channels >= ``first_diff``: guidance that leaves
    out any channel (e.g. guiding only the first three of a 4-channel latent) gives a different answer."""

    def __init__(self, first_diff=3, learned_sigma=False):
        self.first_diff, self.learned_sigma = first_diff, learned_sigma
        self.batches, self.times = [], []

    def __call__(self, x, t, y):
        self.batches.append(y.clone())
        self.times.append(t.clone())
        out = 0.1 * x.clone()
        is_cond = (y != NULL).to(x.dtype)[:, None, None, None]
        out[:, self.first_diff:] += is_cond * (1.0 + y.to(x.dtype)[:, None, None, None])  # only channels 3+
        if self.learned_sigma:
            return torch.cat([out, torch.full_like(out, 0.5) + is_cond], 1)
        return out


def _expected_guided(model, x, t, y, scale):
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, NULL))
    return uncond + scale * (cond - uncond)


def test_guidance_is_applied_to_every_channel():
    model = ChannelModel(first_diff=3)
    x, t, y = torch.randn(2, 4, 3, 3), torch.full((2,), 500.0), torch.tensor([2, 7])
    guided, extra = GuidedDenoiser(model, {"y": y}, {"y": torch.full_like(y, NULL)}, scale=4.0)(x, t, 0.5)
    assert extra is None
    torch.testing.assert_close(guided, _expected_guided(model, x, t, y, 4.0))
    cond = model(x, t, y)
    # channel 3 differs from the conditional output by (scale - 1) * (cond - uncond) = 3 * (1 + y)
    torch.testing.assert_close(guided[:, 3] - cond[:, 3], 3.0 * (1.0 + y.float())[:, None, None].expand(2, 3, 3))
    torch.testing.assert_close(guided[:, :3], cond[:, :3])  # where cond == uncond, guidance changes nothing


def test_guidance_on_all_channels_end_to_end():
    """One Euler step from t=1 to t=0 is x - v: a sampler guiding only the first 3 channels would fail here."""
    model = ChannelModel(first_diff=3)
    noise = torch.randn(3, 6, 2, 2)
    y = torch.tensor([0, 4, 9])
    x = sample(model, noise.shape, {"y": y}, {"y": torch.full_like(y, NULL)}, cfg_scale=2.5, steps=1, noise=noise,
               progress=False)
    v = _expected_guided(ChannelModel(first_diff=3), noise, torch.full((3,), 1000.0), y, 2.5)
    torch.testing.assert_close(x, noise - v)
    unguided = sample(model, noise.shape, {"y": y}, steps=1, noise=noise, progress=False)
    assert not torch.allclose(x[:, 3:], unguided[:, 3:])


def test_cond_and_uncond_run_in_one_batched_call():
    model = ChannelModel()
    y = torch.tensor([1, 2, 3])
    sample(model, (3, 4, 2, 2), {"y": y}, {"y": torch.full_like(y, NULL)}, cfg_scale=3.0, steps=4, seed=0,
           progress=False)
    assert len(model.batches) == 4  # one call per step
    for labels in model.batches:
        assert labels.tolist() == [1, 2, 3, NULL, NULL, NULL]


def test_uncond_with_batch_size_one_is_broadcast_and_mmdit_cond_is_concatenated():
    seen = {}

    def model(x, t, context, context_mask):
        seen["context"], seen["mask"] = context, context_mask
        return (x * context.mean(dim=(1, 2))[:, None, None, None]) * context_mask.any(1)[:, None, None, None]

    B, L, D = 2, 5, 8
    ctx, mask = torch.randn(B, L, D), torch.rand(B, L) > 0.3
    mask[:, 0] = True
    null_ctx, null_mask = torch.randn(1, L, D), torch.zeros(1, L, dtype=torch.bool)
    null_mask[:, 0] = True
    den = GuidedDenoiser(model, {"context": ctx, "context_mask": mask},
                         {"context": null_ctx, "context_mask": null_mask}, scale=2.0)
    den(torch.randn(B, 3, 2, 2), torch.zeros(B), 0.5)
    torch.testing.assert_close(seen["context"], torch.cat([ctx, null_ctx.expand(B, L, D)]))
    assert torch.equal(seen["mask"], torch.cat([mask, null_mask.expand(B, L)]))


def test_scale_one_never_calls_the_unconditional_model():
    def model(x, t, y):
        assert not torch.any(y == NULL), "unconditional call with cfg_scale=1"
        assert x.shape[0] == 2
        return x

    y = torch.tensor([3, 4])
    for sampler in ("euler", "heun", "ddim", "ddpm"):
        sample(model, (2, 4, 2, 2), {"y": y}, {"y": torch.full_like(y, NULL)}, cfg_scale=1.0, sampler=sampler,
               steps=3, seed=0, progress=False)
    sample(model, (2, 4, 2, 2), {"y": y}, None, cfg_scale=1.0, steps=3, seed=0, progress=False)  # no uncond needed


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_guidance_interval_on_flow_samplers(sampler):
    model = ChannelModel()
    y = torch.tensor([5])
    sample(model, (1, 4, 2, 2), {"y": y}, {"y": torch.tensor([NULL])}, cfg_scale=3.0, sampler=sampler, steps=10,
           guidance_interval=(0.25, 0.6), seed=0, progress=False)
    for labels, t in zip(model.batches, model.times):
        t_norm = t[0].item() / 1000
        guided = 0.25 <= t_norm + 1e-9 and t_norm - 1e-9 <= 0.6
        assert labels.numel() == (2 if guided else 1), (t_norm, labels)
    assert sum(labels.numel() == 2 for labels in model.batches) > 0
    assert sum(labels.numel() == 1 for labels in model.batches) > 0


def test_guidance_interval_on_ddim_uses_normalised_steps():
    d = DDPM("linear", 100)
    model = ChannelModel()
    sample(model, (1, 4, 2, 2), {"y": torch.tensor([5])}, {"y": torch.tensor([NULL])}, cfg_scale=3.0,
           sampler="ddim", steps=100, objective=d, guidance_interval=(0.0, 0.3), seed=0, progress=False)
    guided_steps = sorted(int(t[0]) for labels, t in zip(model.batches, model.times) if labels.numel() == 2)
    assert guided_steps == list(range(0, 30))  # (step + 1) / T <= 0.3


def test_guidance_interval_matches_manual_switch():
    """Guided inside the interval, plain conditional outside: compare with an explicit two-phase Euler loop."""
    model = ChannelModel()
    noise, y = torch.randn(2, 4, 2, 2), torch.tensor([1, 2])
    out = sample(model, noise.shape, {"y": y}, {"y": torch.full_like(y, NULL)}, cfg_scale=5.0, steps=4,
                 guidance_interval=(0.0, 0.5), noise=noise, progress=False)
    x = noise.clone()
    for t0, t1 in ((1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)):
        tm = torch.full((2,), t0 * 1000)
        v = _expected_guided(model, x, tm, y, 5.0) if t0 <= 0.5 else model(x, tm, y)
        x = x + (t1 - t0) * v
    torch.testing.assert_close(out, x)


def test_learned_sigma_output_is_guided_on_the_first_half():
    model = ChannelModel(learned_sigma=True)
    x, t, y = torch.randn(2, 4, 3, 3), torch.full((2,), 10.0), torch.tensor([2, 7])
    guided, extra = GuidedDenoiser(model, {"y": y}, {"y": torch.full_like(y, NULL)}, scale=3.0)(x, t, 0.5)
    full_c, full_u = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(guided, full_u[:, :4] + 3.0 * (full_c[:, :4] - full_u[:, :4]))
    torch.testing.assert_close(extra, full_c[:, 4:])  # variance channels come from the conditional half


def test_batched_guidance_equals_separate_calls_with_a_real_network():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    emb = torch.nn.Embedding(NULL + 1, 4)

    def model(x, t, y):
        return net(x) + emb(y)[:, :, None, None] * torch.cos(t / 300)[:, None, None, None]

    x, t, y = torch.randn(3, 4, 5, 5), torch.rand(3) * 1000, torch.tensor([0, 5, 9])
    with torch.no_grad():
        guided, _ = GuidedDenoiser(model, {"y": y}, {"y": torch.full_like(y, NULL)}, scale=1.7)(x, t, 0.5)
        expected = _expected_guided(model, x, t, y, 1.7)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)


def test_guidance_input_errors():
    model = ChannelModel()
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="needs uncond"):
        GuidedDenoiser(model, {"y": y}, None, scale=2.0)
    with pytest.raises(ValueError, match="interval"):
        GuidedDenoiser(model, {"y": y}, {"y": y}, scale=2.0, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="same keys"):
        GuidedDenoiser(model, {"y": y}, {"label": y}, scale=2.0)(torch.randn(2, 4, 2, 2), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="shape"):
        GuidedDenoiser(model, {"y": y}, {"y": torch.tensor([1, 2, 3])}, scale=2.0)(
            torch.randn(2, 4, 2, 2), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="batch size"):
        sample(model, (3, 4, 2, 2), {"y": y}, progress=False)
    with pytest.raises(ValueError, match="dict"):
        GuidedDenoiser(model, y)
    with pytest.raises(ValueError, match="channels"):
        GuidedDenoiser(lambda x, t: x[:, :3])(torch.randn(1, 4, 2, 2), torch.zeros(1), 0.5)
