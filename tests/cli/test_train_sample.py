"""`fastdit train` / `fastdit sample` (fastdit.cli.train, fastdit.cli.sample over fastdit.training.build and
fastdit.training.sampling): tiny models trained for a few steps on CPU,
then sampled from the run directory; the memory data kind; a latent space; the CLI wiring; error messages."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.cli import main as cli_main
from fastdit.training import TrainConfig
from fastdit.cli.sample import main as main_sample
from fastdit.cli.train import main as main_train
from fastdit.training.build import ClassConditioner, build, latents_to_images, save_autoencoder

TINY_DIT = ["model.name=DiT-S/2", "model.options.depth=1", "model.options.hidden_size=32",
            "model.options.num_heads=2", "model.options.input_size=8", "model.options.in_channels=4",
            "model.options.num_classes=10"]
QUIET = ["run.device=cpu", "logging.progress_bar=false", "logging.tensorboard=false", "data.batch_size=4",
         "task.options.sampling.steps=2", "task.options.sampling.per_class=2", "logging.sample_rows=2"]


def _train(out, *extra, steps=3):
    return main_train(["--output-dir", str(out), "--max-steps", str(steps), "--precision", "fp32", *QUIET,
                       *extra])


def _grid_size(path):
    with Image.open(path) as img:
        return img.size, img.mode  # (width, height)


def _error(fn, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A tiny class-conditional DiT trained for 4 steps on synthetic latents (checkpoints at 2 and 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("entry") / "dit"
    try:
        assert _train(out, *TINY_DIT, "data.latent_shape=4,8,8", "data.num_classes=10", "checkpoint.every=2",
                      "logging.sample_every=2", steps=4) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_train_writes_checkpoints_grids_and_config(dit_run):
    assert sorted(os.listdir(dit_run / "checkpoints")) == ["latest", "step_000000002", "step_000000004"]
    for name in ("config.json", "state.pt", "manifest.json"):
        assert (dit_run / "checkpoints" / "step_000000004" / name).is_file()
    # the weights are stored once (state.pt); safetensors exports are opt-in (checkpoint.safetensors=true)
    assert not list((dit_run / "checkpoints" / "step_000000004").glob("*.safetensors"))
    saved = TrainConfig.from_json(str(dit_run / "config.json"))
    assert saved.model.name == "DiT-S/2" and saved.model.options["depth"] == 1 and saved.run.max_steps == 4
    # trainer grid: logging.sample_rows=2 classes x per_class=2 samples of 8x8, 2 px padding
    assert _grid_size(dit_run / "samples" / "step_000000004.png") == ((2 * 10 + 2, 2 * 10 + 2), "RGB")
    records = [json.loads(line) for line in open(dit_run / "metrics.jsonl")]
    assert any("tflops" in r and "tokens_per_s" in r for r in records)  # FLOPs and tokens reached the trainer


def test_sample_from_run_dir_writes_png_and_npz(dit_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main_sample([str(dit_run), "--classes", "0,3,9", "--num-per-class", "2", "--steps", "2",
                        "--output", str(out), "--no-progress", "--batch-size", "4"]) == 0
    assert "6 samples (3 classes x 2)" in capsys.readouterr().out
    assert _grid_size(out) == ((2 * 10 + 2, 3 * 10 + 2), "RGB")  # rows = classes, columns = per class
    data = np.load(tmp_path / "grid.npz")
    assert data["samples"].shape == (6, 4, 8, 8) and data["samples"].dtype == np.float32
    assert data["labels"].tolist() == [0, 0, 3, 3, 9, 9] and data["images"].shape == (6, 3, 8, 8)
    assert str(data["sampler"]) == "euler" and int(data["step"]) == 4 and str(data["weights"]) == "ema"
    assert np.isfinite(data["samples"]).all()
    # per-sample seeds: the first samples do not depend on how many are drawn or the batch size
    assert main_sample([str(dit_run / "checkpoints" / "step_000000004"), "--classes", "0", "--num-per-class",
                        "1", "--steps", "2", "--output", str(tmp_path / "one.png"), "--no-progress"]) == 0
    one = np.load(tmp_path / "one.npz")["samples"]
    torch.testing.assert_close(torch.from_numpy(one[0]), torch.from_numpy(data["samples"][0]))


def test_sample_in_fp8(dit_run, tmp_path, capsys):
    """--precision fp8 switches the blocks' Linear layers to FP8 GEMMs (said on stderr) and samples under bf16
    autocast. (This 4-step run's blocks are still near the identity -- AdaLN-Zero gates start at 0 -- so its
    samples cannot show FP8's error; tests/modules/test_fp8.py compares FP8 sampling on a randomised model.)"""
    assert main_sample([str(dit_run), "--classes", "0,3", "--num-per-class", "2", "--steps", "2",
                        "--precision", "fp8", "--output", str(tmp_path / "fp8.png"), "--no-progress"]) == 0
    assert "fp8 (rowwise): 4 Linear layers in 1 blocks run as FP8 GEMMs" in capsys.readouterr().err
    assert np.isfinite(np.load(tmp_path / "fp8.npz")["samples"]).all()


def test_sample_defaults_no_ema_and_an_older_checkpoint(dit_run, capsys):
    older = dit_run / "checkpoints" / "step_000000002"
    assert main_sample([str(older), "--no-ema", "--steps", "1", "--sampler", "heun", "--no-progress"]) == 0
    data = np.load(dit_run / "samples" / "sample_step_000000002.npz")  # default: <run>/samples/
    # per class: the run's recorded task.options.sampling.per_class=2 (its training grids' setting)
    assert data["samples"].shape == (8, 4, 8, 8) and str(data["weights"]) == "model"
    assert sorted(set(data["labels"].tolist())) == [0, 2, 5, 7]  # 4 classes spread over 0..9


def test_sample_defaults_come_from_the_run(dit_run, tmp_path, capsys):
    """No --steps / --num-per-class / --cfg-scale: the run's task.options.sampling (steps=2, per_class=2)."""
    assert main_sample([str(dit_run), "--classes", "1", "--output", str(tmp_path / "d.png"), "--no-progress"]) == 0
    assert "2 samples (1 classes x 2), euler 2 steps, cfg 4" in capsys.readouterr().out
    data = np.load(tmp_path / "d.npz")
    assert int(data["steps"]) == 2 and float(data["cfg_scale"]) == 4.0


@pytest.mark.parametrize("argv,message", [
    (["--sampler", "ddim"], "does not match the rectified_flow objective"),
    (["--classes", "0,10"], "class id(s) [10] out of range"),
    (["--classes", "a,b"], "comma-separated integers"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--guidance-interval", "0.8,0.2"], "0 <= LO <= HI <= 1"),
])
def test_sample_errors(dit_run, argv, message, capsys):
    assert message in _error(main_sample, [str(dit_run), *argv], capsys)


def test_sample_missing_checkpoint(tmp_path, capsys):
    assert "no fastdit checkpoint at or under" in _error(main_sample, [str(tmp_path / "nowhere")], capsys)
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    assert "checkpoint" in _error(main_sample, [str(tmp_path / "empty_run")], capsys)
    (tmp_path / "no_runs").mkdir()
    assert "no fastdit checkpoint at or under" in _error(main_sample, [str(tmp_path / "no_runs")], capsys)


def test_resume_continues_the_run(dit_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    args = [*TINY_DIT, "data.latent_shape=4,8,8", "data.num_classes=10", "checkpoint.every=2"]
    assert _train(out, *args, steps=2) == 0
    assert _train(out, *args, steps=3) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "step 3/3" in summary and "resumed from" in summary and "step_000000002" in summary


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_memory_kind_from_a_file(tmp_path, suffix, capsys):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 2, 8, 8, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, x=x.numpy(), y=y.numpy().astype(np.int32))
    else:
        torch.save({"x": x, "y": y}, path)
    out = tmp_path / "run"
    # latent_shape is left at its default (4, 32, 32): the memory kind takes it from the file
    assert _train(out, "model.name=DiT-S/2", "model.options.depth=1", "model.options.hidden_size=32",
                  "model.options.num_heads=2", "data.kind=memory", f"data.path={path}", "data.num_classes=3",
                  "ema.enabled=false", steps=2) == 0
    assert list(TrainConfig.from_json(str(out / "config.json")).data.latent_shape) == [2, 8, 8]
    capsys.readouterr()
    assert main_sample([str(out), "--steps", "1", "--num-per-class", "1", "--no-progress"]) == 0
    assert "has no EMA weights" in capsys.readouterr().err
    data = np.load(out / "samples" / "sample_step_000000002.npz")
    assert data["samples"].shape == (3, 2, 8, 8) and data["images"].shape == (3, 1, 8, 8)  # C < 3: grey


def test_mmdit_ddpm_on_label_captions(tmp_path, capsys):
    out = tmp_path / "mmdit"
    assert _train(out, "model.name=MMDiT-Tiny/2", "model.options.hidden_size=32", "model.options.num_heads=2",
                  "model.options.caption_dim=8", "data.latent_shape=4,8,8", "data.num_classes=5",
                  "data.options.caption_len=3", "task.name=ddpm", "task.options.num_timesteps=50",
                  "logging.sample_every=2", steps=2) == 0
    assert (out / "samples" / "step_000000002.png").is_file()
    assert main_sample([str(out), "--steps", "2", "--classes", "4,1", "--num-per-class", "1",
                        "--no-progress"]) == 0
    data = np.load(out / "samples" / "sample_step_000000002.npz")
    assert data["samples"].shape == (2, 4, 8, 8) and str(data["sampler"]) == "ddim"
    assert "use ddim or ddpm" in _error(main_sample, [str(out), "--sampler", "euler"], capsys)


def test_memory_captions_for_mmdit_and_no_class_sampling(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "captions.npz"
    np.savez(path, x=torch.randn(6, 4, 8, 8, generator=gen).numpy(),
             context=torch.randn(6, 5, 8, generator=gen).numpy(), context_mask=np.array([5, 3, 1, 0, 2, 4]))
    cfg = TrainConfig.from_dict({"model": {"name": "MMDiT-Tiny/2", "options": {"hidden_size": 32, "num_heads": 2,
                                                                               "caption_dim": 8}},
                                 "data": {"kind": "memory", "path": str(path), "batch_size": 3},
                                 "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"}})
    built = build(cfg, rank=0, world_size=1)
    batch = next(iter(built.dataset))
    assert set(batch) == {"x", "context", "context_mask"} and batch["context_mask"].dtype == torch.bool
    assert built.task.cond_keys == ("context", "context_mask") and built.task.caption_dropout == 0.1
    assert built.conditioner is None and not hasattr(built.task, "samples")  # captions have no class ids
    assert built.task.tokens_per_sample == 16 + 5
    assert built.task.flops_per_sample == built.model.flops_per_sample(8, 8, caption_len=5, training=True)
    assert float(built.task.loss(built.model, batch).detach()) > 0


def test_latent_space_decodes_the_grid(tmp_path):
    from fastdit.latents import ConvAutoencoder

    ae = ConvAutoencoder(image_channels=1, latent_channels=4, channels=(8, 8))
    ae_path = tmp_path / "ae.pt"
    save_autoencoder(ae, str(ae_path))
    out = tmp_path / "run"
    assert _train(out, *TINY_DIT, "model.options.input_size=4", "data.latent_shape=4,4,4", "data.num_classes=10",
                  f"data.options.autoencoder={ae_path}", "logging.sample_every=1", steps=1) == 0
    assert _grid_size(out / "samples" / "step_000000001.png") == ((2 * 18 + 2, 2 * 18 + 2), "L")
    assert main_sample([str(out), "--steps", "1", "--num-per-class", "1", "--classes", "1", "--no-progress"]) == 0
    data = np.load(out / "samples" / "sample_step_000000001.npz")
    assert data["samples"].shape == (1, 4, 4, 4) and data["images"].shape == (1, 1, 16, 16)


@pytest.mark.parametrize("learn_sigma,variance", [(True, "learned_range"), (False, "fixed")])
def test_ddpm_trains_a_learned_sigma_with_the_hybrid_loss(tmp_path, learn_sigma, variance):
    """task.name=ddpm: a DiT with learned sigma gets improved DDPM's hybrid loss; one without, L_simple."""
    overrides = [*TINY_DIT, "model.options.input_size=8", "data.latent_shape=4,8,8", "data.num_classes=10",
                 "task.name=ddpm", "task.options.schedule=quadratic", f"model.options.learn_sigma={str(learn_sigma).lower()}",
                 "run.device=cpu", f"run.output_dir={tmp_path}"]
    built = build(TrainConfig.from_dict({}, overrides), rank=0, world_size=1)
    assert built.objective.variance == variance and built.objective.schedule == "quadratic"
    batch = next(iter(built.dataset))
    loss = built.task.loss(built.model, batch)
    loss.backward()
    last = built.model.final_layer.linear
    grad_sigma = last.weight.grad.view(-1, 2, 4, last.weight.shape[-1])[:, 1] if learn_sigma else None
    assert torch.isfinite(loss) and (grad_sigma is None or grad_sigma.abs().max() > 0)


def test_latents_to_images_and_default_classes():
    x = torch.randn(2, 4, 3, 3) * 5
    img = latents_to_images(x, display_scale=2.0)
    assert img.shape == (2, 3, 3, 3) and img.abs().max() <= 1
    torch.testing.assert_close(img, (x[:, :3] / 2).clamp(-1, 1))
    assert latents_to_images(torch.randn(1, 2, 3, 3)).shape == (1, 1, 3, 3)
    cond = ClassConditioner(1000, null_class=1000)
    assert cond.default_classes(4) == [0, 250, 500, 750] and ClassConditioner(2).default_classes(4) == [0, 1]
    c, u = cond(torch.tensor([3, 5]), "cpu")
    assert c["y"].tolist() == [3, 5] and u["y"].tolist() == [1000, 1000]


@pytest.mark.parametrize("extra,message", [
    (["data.kind=lmdb"], "data.kind must be one of synthetic, memory, latents, webdataset, folder, urls"),
    (["data.kind=memory"], "data.kind=memory needs data.path"),
    (["data.kind=memory", "data.path=/nonexistent/x.npz"], "no file at"),
    (["model.name=DiT-Q/2"], "unknown model.name 'DiT-Q/2'"),
    (["task.name=edm"], "task.name must be one of rectified_flow, ddpm"),
    (["task.options.sigma=3"], "unknown option(s) sigma for rectified_flow"),
    (["task.options.caption_dropout=0.1"], "caption_dropout applies to MMDiT"),
    (["task.options.sampling.sampler=ddpm"], "does not match the rectified_flow objective"),
    (["data.options.colour=1"], "unknown key(s) colour for kind synthetic"),
    (["model.options.in_channels=3"], "does not match data.latent_shape"),
    (["model.options.depthh=2"], "unknown field(s) depthh"),
    (["optim.lrr=1"], "unknown config key optim.lrr"),
    (["task.name=ddpm", "model.options.learn_sigma=false", "task.options.variance=learned_range"],
     "needs a model with learned sigma"),
    (["task.name=ddpm", "task.options.schedule=sigmoid"], "schedule must be one of cosine, linear, quadratic"),
])
def test_train_config_errors(tmp_path, extra, message, capsys):
    argv = ["--output-dir", str(tmp_path), *QUIET, *TINY_DIT, "data.latent_shape=4,8,8", "data.num_classes=10",
            *extra]
    assert message in _error(main_train, argv, capsys)
    assert not (tmp_path / "checkpoints").exists()


def test_memory_file_errors(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 4, 8, 8), np.float32))
    base = ["--output-dir", str(tmp_path / "r"), *QUIET, *TINY_DIT, "data.kind=memory", f"data.path={path}"]
    assert "needs 'y', integer labels" in _error(main_train, base, capsys)
    np.savez(path, x=np.zeros((4, 4, 8, 8), np.float32), y=np.array([0, 1, 2, 12]))
    assert "labels in" in _error(main_train, [*base, "data.num_classes=10"], capsys)
    (tmp_path / "data.txt").write_text("x")
    assert "neither a .pt nor an .npz" in _error(main_train, [*base[:-1], f"data.path={tmp_path / 'data.txt'}"],
                                                 capsys)


def test_print_config(capsys):
    assert main_train(["--print-config", *TINY_DIT, "optim.lr=0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 0.5


def test_cli_dispatches_train_and_sample(dit_run, tmp_path, capsys):
    assert cli_main(["sample", str(dit_run), "--steps", "1", "--num-per-class", "1", "--classes", "2",
                     "--output", str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert (tmp_path / "g.png").is_file() and (tmp_path / "g.npz").is_file()
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--help"])
    assert exc.value.code == 0 and "fastdit train" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "sample"])
def test_cli_help_in_a_subprocess(command):
    run = subprocess.run([sys.executable, "-m", "fastdit.cli", command, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"usage: fastdit {command}" in run.stdout
    assert ("--config" if command == "train" else "--cfg-scale") in run.stdout


@pytest.mark.slow
def test_train_under_torchrun_two_ranks(tmp_path):
    """Two gloo ranks through torchrun, then sampling from the run they wrote."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "fastdit.cli", "train", "--output-dir", str(out), "--max-steps", "3", "--precision", "fp32", *QUIET,
           *TINY_DIT, "data.latent_shape=4,8,8", "data.num_classes=10", "logging.sample_every=3",
           "run.dist_timeout_s=60"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("fastdit train:") == 1 and "2 rank(s)" in run.stdout  # rank 0 prints the summary
    assert (out / "samples" / "step_000000003.png").is_file()
    state = torch.load(out / "checkpoints" / "step_000000003" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert main_sample([str(out), "--steps", "1", "--num-per-class", "1", "--no-progress"]) == 0
