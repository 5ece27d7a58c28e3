"""Compiled sampling steps (fastdit.diffusion.compiled, ``sample(compile=True)``, ``fastdit sample --compile``).

Compiled and eager samples agree to float tolerance (Inductor fuses differently), two compiled runs bitwise;
a run compiles at most two graphs (guided, unguided) whatever its number of steps; each new shape signature
prints one line. The tests run where the ``device`` fixture says (CUDA graphs on a GPU). The DiT tests come
first and share their graphs (same architecture and shapes); the graph-counting tests after them reset Dynamo.
"""
import pytest
import torch
from torch import nn

from fastdit.diffusion import (DDIMSampler, DDPM, DDPMSampler, EulerSampler, GuidedDenoiser, HeunSampler,
                               PerSampleNoise, sample)
from fastdit.diffusion.compiled import CompiledDenoiser
from fastdit.models import DiT, DiTConfig

def _cpp_compiler():
    """Inductor compiles C++ for the CPU: a machine without a compiler cannot run these tests there."""
    import os
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not torch.cuda.is_available() and not _cpp_compiler(),
                                 reason="torch.compile on the CPU needs a C++ compiler (none found)")]

NULL = 10  # the null class of the 10-class test models
SHAPE = (3, 4, 8, 8)
INTERVAL = (0.3, 0.8)  # with 10 steps, some steps guided and some not: both graphs run


def _graphs_compiled():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _cudagraph_skips():
    """How many compiled graphs Inductor ran without CUDA graphs (it says why in a log line): must stay 0."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _compile_lines(err):
    return [line for line in err.splitlines() if line.startswith("fastdit.sample: compiling")]


@pytest.fixture
def dit(device):
    """A tiny DiT with learned sigma (2C output channels: ddpm's learned_range variance reads the extra C), its
    weights randomised: a fresh DiT outputs zeros."""
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                          num_classes=NULL), backend="reference")
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model.to(device).eval()


def _labels(device, batch=SHAPE[0]):
    y = torch.arange(batch, device=device) % NULL
    return {"y": y}, {"y": torch.full_like(y, NULL)}


def _runners():
    ddpm = DDPM("linear", 100)
    return {"euler": EulerSampler(steps=10), "heun": HeunSampler(steps=5), "ddim": DDIMSampler(ddpm, steps=10),
            "ddpm": DDPMSampler(ddpm, steps=10, variance="learned_range")}


@pytest.mark.parametrize("name", ["euler", "heun", "ddim", "ddpm"])
def test_compiled_sampling_matches_eager_with_cfg_and_a_guidance_interval(dit, device, name):
    runner = _runners()[name]
    cond, uncond = _labels(device)
    noise = torch.randn(SHAPE, device=device)
    out, nfe = {}, {}
    for compiled in (False, True):
        out[compiled] = runner(dit, noise, cond, uncond, cfg_scale=4.0, guidance_interval=INTERVAL,
                               noise_source=PerSampleNoise.create(SHAPE[0], seed=7), progress=False,
                               compile=compiled)
        nfe[compiled] = runner.last_nfe
    assert nfe[True] == nfe[False] == 10  # heun: 5 steps of 2 calls
    assert out[True].shape == SHAPE and out[True].dtype == torch.float32 and torch.isfinite(out[False]).all()
    # DDPM/DDIM states reach |x| ~ 1e3 on an untrained eps model: the tolerance is relative
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4 * out[False].abs().max().item())


@pytest.mark.parametrize("name", ["heun", "ddpm"])
def test_two_compiled_runs_are_bitwise_identical(dit, device, name):
    cond, uncond = _labels(device)
    kwargs = dict(cfg_scale=4.0, sampler=name, steps=10 if name == "ddpm" else 5, guidance_interval=INTERVAL,
                  objective=DDPM("linear", 100) if name == "ddpm" else None, seed=[3, 4, 5], progress=False,
                  compile=True)
    first = sample(dit, SHAPE, cond, uncond, **kwargs)
    assert torch.equal(first, sample(dit, SHAPE, cond, uncond, **kwargs))
    assert not torch.equal(first, sample(dit, SHAPE, cond, uncond, **{**kwargs, "seed": [3, 4, 6]}))


@pytest.mark.parametrize("t_norm", [0.5, 0.9])  # inside and outside the guidance interval
def test_compiled_denoiser_guides_and_cuts_learned_sigma_like_the_eager_one(dit, device, t_norm):
    cond, uncond = _labels(device)
    x, t = torch.randn(SHAPE, device=device), torch.full((SHAPE[0],), 1000.0 * t_norm, device=device)
    with torch.no_grad():
        eager = GuidedDenoiser(dit, cond, uncond, 4.0, INTERVAL)(x, t, t_norm)
        compiled = CompiledDenoiser(dit, cond, uncond, 4.0, INTERVAL)(x, t, t_norm)
    assert compiled[0].shape == compiled[1].shape == SHAPE  # prediction and the cond half's sigma channels
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)


class TinyDenoiser(nn.Module):
    """A conv and a label embedding modulated by time: compiles in a fraction of a DiT's time."""

    def __init__(self, channels=4, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Embedding(NULL + 1, out_channels)
        self.negate = False  # a Python flag the graph bakes in: flipping it recompiles

    def forward(self, x, t, y):
        out = self.conv(x) + self.emb(y)[:, :, None, None] * torch.cos(t / 300)[:, None, None, None]
        return -out if self.negate else out


@pytest.fixture
def tiny(device):
    torch._dynamo.reset()  # graphs of earlier tests must not count as already compiled
    return TinyDenoiser().to(device).eval()


def test_a_run_compiles_at_most_two_graphs_and_a_repeated_run_none(tiny, device, capsys):
    cond, uncond = _labels(device, 2)
    guided_run = dict(cfg_scale=3.0, steps=10, guidance_interval=INTERVAL, seed=0, progress=False, compile=True)
    before, skips = _graphs_compiled(), _cudagraph_skips()
    sample(tiny, (2, 4, 6, 6), cond, uncond, **guided_run)
    assert _graphs_compiled() - before == 2  # guided and unguided, not one per step
    assert _cudagraph_skips() == skips  # on CUDA both run as CUDA graphs (elsewhere none are asked for)
    assert len(_compile_lines(capsys.readouterr().err)) == 2

    before = _graphs_compiled()
    sample(tiny, (2, 4, 6, 6), cond, uncond, **guided_run)
    sample(tiny, (2, 4, 6, 6), cond, uncond, **{**guided_run, "sampler": "heun", "steps": 4})  # same graphs
    assert _graphs_compiled() == before
    assert capsys.readouterr().err == ""

    cond, _ = _labels(device, 5)
    before = _graphs_compiled()
    sample(tiny, (5, 4, 6, 6), cond, steps=10, seed=0, progress=False, compile=True)  # unguided: one graph
    assert _graphs_compiled() - before == 1


def test_each_new_signature_prints_one_line(tiny, device, capsys):
    cond, uncond = _labels(device, 2)
    run = dict(cfg_scale=2.0, steps=3, seed=0, progress=False, compile=True)
    sample(tiny, (2, 4, 6, 6), cond, uncond, **run)
    lines = _compile_lines(capsys.readouterr().err)
    assert lines == [f"fastdit.sample: compiling the denoiser step for batch 2, latents (4, 6, 6) float32, "
                     f"y (2,) int64, guided (cond + uncond as one batch of 4) on {torch.device(device)}"
                     f"{' with CUDA graphs' if torch.device(device).type == 'cuda' else ''}"]
    sample(tiny, (2, 4, 6, 6), cond, uncond, **run)
    assert capsys.readouterr().err == ""
    cond, uncond = _labels(device, 3)
    sample(tiny, (3, 4, 6, 6), cond, uncond, **run)
    lines = _compile_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "batch 3," in lines[0] and "one batch of 6" in lines[0]


def test_a_recompile_without_a_new_signature_is_reported(tiny, device, capsys):
    cond, _ = _labels(device, 2)
    run = dict(steps=2, seed=0, progress=False, compile=True)
    plain = sample(tiny, (2, 4, 6, 6), cond, **run)
    tiny.negate = True
    negated = sample(tiny, (2, 4, 6, 6), cond, **run)
    err = capsys.readouterr().err
    assert len(_compile_lines(err)) == 1
    assert "fastdit.sample: recompiled the denoiser step for an already compiled batch 2" in err
    assert not torch.allclose(plain, negated)


def test_compile_input_errors(device):
    torch._dynamo.reset()
    cond, uncond = _labels(device, 2)
    with pytest.raises(ValueError, match="nn.Module or a callable"):
        sample(42, (2, 4, 6, 6), cond, progress=False, compile=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        sample(TinyDenoiser(), (2, 4, 6, 6), cond, progress=False, compile="yes")
    with pytest.raises(ValueError, match="needs uncond"):
        sample(TinyDenoiser(), (2, 4, 6, 6), cond, cfg_scale=2.0, progress=False, compile=True)
    # an error met while tracing surfaces as the model's own error, not Dynamo's wrapper
    with pytest.raises(ValueError, match="model output has 3 channels"):
        sample(lambda x, t, y: x[:, :3], (2, 4, 6, 6), cond, steps=2, device=device, progress=False, compile=True)

    def branchy(x, t, y):  # data-dependent control flow cannot be one graph: Dynamo's error is raised as is
        return x if bool(x.sum() > 0) else -x

    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        sample(branchy, (2, 4, 6, 6), cond, steps=2, device=device, progress=False, compile=True)


def test_cli_has_a_compile_flag_and_passes_it_on(monkeypatch, capsys):
    from fastdit.cli import sample as cli_sample
    from fastdit.training import sampling

    assert "--compile" in cli_sample.parser().format_help()
    seen = {}

    def fake_sample_checkpoint(path, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(sampling, "sample_checkpoint", fake_sample_checkpoint)
    for argv, expected in ((["run", "--compile"], True), (["run"], False)):
        with pytest.raises(SystemExit):
            cli_sample.main(argv)
        assert seen["compile"] is expected
    capsys.readouterr()
