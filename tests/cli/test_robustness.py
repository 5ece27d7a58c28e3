"""The `fastdit` command as a user meets it, through the installed entry point in a subprocess: overrides
anywhere on the line, a required and checked output folder, runs that cannot resume each other, clear errors
for bad checkpoints and hub ids, sampling that never overwrites silently, by prompt for caption runs."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdit

TINY_DIT = ["model.name=DiT-S/2", "model.options.depth=1", "model.options.hidden_size=32",
            "model.options.num_heads=2", "data.latent_shape=4,8,8", "data.num_classes=10"]
QUIET = ["run.device=cpu", "logging.progress_bar=false", "logging.tensorboard=false", "data.batch_size=4",
         "run.precision=fp32", "data.prefetch=0"]


def fastdit_cmd():
    """The installed console script beside this interpreter, else `python -m fastdit.cli`."""
    script = os.path.join(os.path.dirname(sys.executable), "fastdit")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "fastdit.cli"]


def run_cli(*args, cwd=None, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*fastdit_cmd(), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DiT trained 2 steps by the real command, overrides placed after options (intermixed)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run_cli("train", "--output-dir", out, "--max-steps", 2, *QUIET, "--seed", 3, *TINY_DIT,
                "checkpoint.every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_version_matches_the_package_metadata():
    from importlib.metadata import version

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastdit {fastdit.__version__}"
    assert version("fastdit") == fastdit.__version__


def test_bare_overrides_after_options_are_applied(trained):
    saved = json.loads((trained / "config.json").read_text())
    assert saved["run"]["seed"] == 3 and saved["model"]["options"]["depth"] == 1
    assert saved["run"]["max_steps"] == 2 and saved["data"]["latent_shape"] == [4, 8, 8]


def test_train_requires_an_output_dir(tmp_path):
    r = run_cli("train", "--max-steps", 1, *QUIET, *TINY_DIT, cwd=tmp_path)
    assert r.returncode == 2 and "run.output_dir is required" in r.stderr and "--output-dir" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_different_model_refuses_to_resume_and_names_the_fields(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    r = run_cli("train", "--output-dir", copy, "--max-steps", 3, *QUIET, *TINY_DIT, "model.options.hidden_size=64")
    assert r.returncode != 0
    assert "model.options.hidden_size" in r.stderr and "32" in r.stderr and "64" in r.stderr
    assert "size mismatch" not in r.stderr and "Traceback" not in r.stderr


def test_output_dir_that_is_a_file_fails_before_training(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    r = run_cli("train", "--output-dir", tmp_path / "taken", "--max-steps", 1, *QUIET, *TINY_DIT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(tmp_path / "taken") in r.stderr and "FileExistsError" not in r.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoints folder goes")
    r = run_cli("train", "--output-dir", tmp_path / "run", "--max-steps", 1, *QUIET, *TINY_DIT)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "checkpoints" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "step" not in (
        tmp_path / "run" / "metrics.jsonl").read_text()


def test_train_help_explains_the_sections_in_the_help():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    assert "fastdit/training" not in r.stdout and "entry.py" not in r.stdout
    for words in ("model.name", "DiT-XL/2", "data.kind", "task.name", "optim:", "lr=0.0001", "output_dir=(required)"):
        assert words in r.stdout


def test_sample_accepts_set_and_never_overwrites_silently(trained):
    first = run_cli("sample", trained, "--steps", 1, "--num-per-class", 1, "--no-progress",
                    "--set", "model.options.backend=reference", "--device", "cpu")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli("sample", trained, "--steps", 1, "--num-per-class", 1, "--no-progress", "--device", "cpu")
    assert second.returncode == 0, second.stderr[-2000:]
    samples = sorted(os.listdir(trained / "samples"))
    assert "sample_step_000000002.png" in samples and "sample_step_000000002-2.png" in samples
    assert "writing" in second.stderr and "-2.png" in second.stderr
    explicit = trained / "samples" / "sample_step_000000002.png"
    r = run_cli("sample", trained, "--steps", 1, "--num-per-class", 1, "--no-progress", "--output", explicit)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_cli("sample", trained, "--steps", 1, "--num-per-class", 1, "--no-progress", "--output", explicit,
                "--overwrite", "--set", "optim.nope=1")
    assert r.returncode == 2 and "optim.nope" in r.stderr


def test_a_pickle_payload_is_not_loaded(trained, tmp_path):
    bad = tmp_path / "step_000000009"
    bad.mkdir()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(bad / "state.pt", "wb") as fh:
        pickle.dump({"x": Payload()}, fh)
    shutil.copy(trained / "config.json", bad / "config.json")
    r = run_cli("sample", bad, "--steps", 1, "--no-progress")
    assert r.returncode == 2 and "not a fastdit checkpoint or unsafe pickle" in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "pwned").exists() and "UnpicklingError" not in r.stderr


def test_a_truncated_newest_checkpoint_falls_back_when_sampling(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    newest = copy / "checkpoints" / "step_000000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    r = run_cli("sample", copy, "--steps", 1, "--num-per-class", 1, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step_000000002" in r.stderr and "step 1" in r.stdout  # warned about the bad one, used the older


def test_a_hub_id_for_the_vae_is_never_downloaded(monkeypatch):
    import socket

    from fastdit.training import ConfigError, TrainConfig
    from fastdit.training.build import build_latent_space

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = TrainConfig.from_dict({"data": {"options": {"vae": "stabilityai/sd-vae-ft-mse"}}})
    with pytest.raises(ConfigError, match="no local AutoencoderKL at stabilityai/sd-vae-ft-mse.*vae_allow_download"):
        build_latent_space(config)


# ---- caption runs sampled from prompts -----------------------------------------------------------------------
def tiny_text_encoder(path):
    """A randomly initialised 2-layer BERT with a 40-word vocabulary, saved as a local transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "handwritten", "digit", "number", "by",
             "hand", "written", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(str(path))
    return path


def test_a_caption_run_samples_from_prompts(tmp_path):
    from fastdit.text import CaptionEncoder

    encoder_dir = tiny_text_encoder(tmp_path / "encoder")
    encoder = CaptionEncoder(encoder_dir, max_length=8)
    captions = ["a handwritten seven", "the digit two", "number one", "a two written by hand"]
    context, mask = encoder.encode(captions)
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "captions.npz"
    np.savez(data, x=torch.randn(4, 4, 8, 8, generator=gen).numpy(), context=context.numpy(),
             context_mask=mask.numpy())
    out = tmp_path / "run"
    options = json.dumps({"caption_encoder": {"path": str(encoder_dir), "max_length": 8}})
    r = run_cli("train", "--output-dir", out, "--max-steps", 1, *QUIET, "model.name=MMDiT-Tiny/2",
                "model.options.hidden_size=32", "model.options.num_heads=2", "model.options.depth=1",
                "model.options.caption_dim=16", "data.kind=memory", f"data.path={data}", f"data.options={options}")
    assert r.returncode == 0, r.stderr[-3000:]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit two\n\nnumber nine\n")
    r = run_cli("sample", out, "--prompt", "a handwritten seven", "--prompts-file", prompts, "--num-per-class", 2,
                "--steps", 1, "--no-progress", "--output", tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 samples (3 prompts x 2)" in r.stdout
    saved = np.load(tmp_path / "grid.npz")
    assert saved["prompts"].tolist() == ["a handwritten seven", "the digit two", "number nine"]
    assert saved["samples"].shape == (6, 4, 8, 8) and np.isfinite(saved["samples"]).all()
    r = run_cli("sample", out, "--classes", "1", "--steps", 1, "--no-progress")
    assert r.returncode == 2 and "caption" in r.stderr


def test_prompts_are_refused_for_a_class_model(trained):
    r = run_cli("sample", trained, "--prompt", "a seven", "--steps", 1, "--no-progress")
    assert r.returncode == 2 and "class-conditional" in r.stderr
