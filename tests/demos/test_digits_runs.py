"""The digits demo's runs are complete: the denoiser's stored config rebuilds the trained model
(fastdit.training.build.build_model, strict weights) and names the data and the autoencoder that was used
(fitted latent statistics); the console summary does not grade a quick run against the full demo's target."""
import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import torch

from fastdit.demos import digits
from fastdit.demos.digits import DigitsDemoConfig, summary_lines
from fastdit.metrics import frechet_distance
from fastdit.training.build import build_model


def _tiny(tmp_path, mode="class", task="rectified_flow"):
    """The quick demo with even fewer steps and a smaller denoiser (seconds on a CPU)."""
    quick = DigitsDemoConfig(out_dir=str(tmp_path / "demo"), mode=mode, task=task, device="cpu",
                             progress=False).quick()
    return dataclasses.replace(quick, ae_steps=3, dit_steps=3, ae_batch=32, dit_batch=32, samples_per_class=1,
                               sample_steps=2, hidden_size=32, num_heads=2, depth=2)


def _check_run(out, ae_used_stats=None, task="rectified_flow"):
    from fastdit.diffusion import DDPM, RectifiedFlow
    from fastdit.training import TrainConfig
    from fastdit.training.build import build_latent_space, build_model, build_objective, model_family
    from fastdit.training.checkpoint import load_state

    config = TrainConfig.from_json(os.path.join(out, "denoiser", "config.json"))
    # the stored config says what was trained: the latents file and the autoencoder in the out dir
    assert config.data.kind == "memory" and config.data.num_classes == 10
    assert os.path.samefile(config.data.path, os.path.join(out, "latents.pt"))
    assert os.path.samefile(config.data.options["autoencoder"], os.path.join(out, "autoencoder.pt"))
    assert config.task.name == task
    if task == "rectified_flow":
        assert config.task.options["time_sampling"] == "logit_normal"
        assert config.task.options["sampling"]["sampler"] == "euler"
    else:
        assert {k: config.task.options[k] for k in ("schedule", "variance", "num_timesteps")} == {
            "schedule": "linear", "variance": "learned_range", "num_timesteps": 1000}
        assert config.task.options["sampling"]["sampler"] == "ddpm"
    assert os.path.samefile(config.run.output_dir, os.path.join(out, "denoiser"))
    data = torch.load(config.data.path, weights_only=True)
    assert list(config.data.latent_shape) == list(data["x"].shape[1:]) == [4, 4, 4]

    model = build_model(config)
    checkpoints = sorted(glob.glob(os.path.join(out, "denoiser", "checkpoints", "step_*")))
    assert checkpoints
    state = load_state(checkpoints[-1])
    model.load_state_dict(state["model"], strict=True)  # the same architecture, every key
    assert model.config.patch_size == 1 and model.config.hidden_size == 32
    assert model.config.learn_sigma == (task == "ddpm") == config.model.options["learn_sigma"]
    # the objective the config rebuilds is the one that was trained
    objective = build_objective(config, model)
    if task == "rectified_flow":
        assert isinstance(objective, RectifiedFlow)
    else:
        assert isinstance(objective, DDPM) and objective.schedule == "linear"
        assert objective.num_timesteps == 1000 and objective.variance == "learned_range"
    # the autoencoder stage names no model preset (nothing there to sample: `fastdit sample <out>` picks the
    # denoiser), but records the ConvAutoencoder it trained and its own run folder
    ae_config = TrainConfig.from_json(os.path.join(out, "autoencoder", "config.json"))
    assert ae_config.model.name == "" and ae_config.model.options["latent_channels"] == 4
    assert os.path.samefile(ae_config.run.output_dir, os.path.join(out, "autoencoder"))
    # the checkpoint's copy of the config is the same
    assert TrainConfig.from_json_string(state["config"]).to_dict() == config.to_dict()

    # the autoencoder file is the latent space the run used: fitted statistics
    ae = build_latent_space(config)
    assert ae.stats_fitted and ae.latent_mean.abs().min() > 0
    assert not torch.equal(ae.latent_std, torch.ones_like(ae.latent_std))
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["task"] == task
    assert torch.equal(ae.latent_mean, torch.tensor(report["autoencoder"]["latent_mean"]))
    assert torch.equal(ae.latent_std, torch.tensor(report["autoencoder"]["latent_std"]))
    if ae_used_stats is not None:
        assert torch.equal(ae.latent_mean, ae_used_stats[0]) and torch.equal(ae.latent_std, ae_used_stats[1])
    # and it encodes the training digits to the latents the denoiser was trained on
    images, labels = digits.load_digit_images(16)
    train_idx, _ = digits.split_held_out(labels, 0.2, 0)
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(images[train_idx[:64]]), data["x"][:64], rtol=1e-4, atol=1e-4)
    assert torch.equal(data["y"], labels[train_idx])
    return config, model_family(config), data, report


def test_class_run_rebuilds_from_its_config(tmp_path, monkeypatch):
    cfg = dataclasses.replace(_tiny(tmp_path), cfg_scale=2.0, guidance_interval=(0.0, 0.6))
    used = {}
    train_ae = digits.train_autoencoder

    def spy(*args, **kwargs):  # the AE the demo encodes with and samples through
        ae, info = train_ae(*args, **kwargs)
        used["stats"] = (ae.latent_mean.detach().cpu().clone(), ae.latent_std.detach().cpu().clone())
        return ae, info

    monkeypatch.setattr(digits, "train_autoencoder", spy)
    report = digits.run(cfg)
    assert report["quick"] is True and report["target_met"] is None
    assert report["sampling"] == {"sampler": "euler", "steps": 2, "cfg_scale": 2.0, "guidance_interval": [0.0, 0.6]}
    # the sample-quality figures are reported (without verdicts: a quick run's figures mean little)
    assert report["quality_targets_met"] is None and report["fd_sample_count"] == 10
    for key in ("fd_samples_vs_held_out", "fd_real_train_vs_held_out", "precision", "recall", "precision_real_train",
                "recall_real_train", "feature_extractor_held_out_accuracy"):
        assert np.isfinite(report[key]) and report[key] >= 0, key
    assert sorted(report["recall_per_class"]) == [str(c) for c in range(10)]
    assert json.loads(open(os.path.join(cfg.out_dir, "report.json")).read())["recall"] == report["recall"]
    assert not any("target" in line for line in summary_lines(report)[2:5])
    config, family, data, _ = _check_run(cfg.out_dir, used["stats"])
    assert family == "DiT" and config.model.name == "DiT-S/2"
    assert config.model.options["class_dropout_prob"] == cfg.cond_dropout
    assert "caption_encoder" not in config.data.options
    # the guidance interval is recorded, so `fastdit sample` replays it
    assert config.task.options["sampling"]["guidance_interval"] == [0.0, 0.6]
    from fastdit.training.sampling import recorded_settings
    assert recorded_settings(config)["guidance_interval"] == [0.0, 0.6]


def test_ddpm_class_run_rebuilds_from_its_config(tmp_path):
    """task="ddpm": a learned-sigma DiT trained as a DDPM (learned-range variance), sampled with DDPM steps."""
    cfg = _tiny(tmp_path, task="ddpm")
    report = digits.run(cfg)
    config, family, _, _ = _check_run(cfg.out_dir, task="ddpm")
    assert family == "DiT" and config.model.name == "DiT-S/2"
    assert config.task.options["sampling"]["steps"] == 2
    assert report["sampling"] == {"sampler": "ddpm", "steps": 2, "cfg_scale": cfg.cfg_scale,
                                  "variance": "learned_range"}
    with torch.no_grad():
        out = build_model(config)(torch.zeros(2, 4, 4, 4), torch.zeros(2), y=torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 4, 4)  # eps and the variance interpolation


def test_ddpm_samples_100_steps_unless_told():
    cfg = DigitsDemoConfig(task="ddpm")
    assert cfg.sampling_steps() == 100 and cfg.sampler() == "ddpm"
    assert DigitsDemoConfig().sampling_steps() == 40 and DigitsDemoConfig().sampler() == "euler"
    assert DigitsDemoConfig(task="ddpm", sample_steps=25).sampling_steps() == 25
    with pytest.raises(ValueError, match="the captions mode trains with rectified flow only"):
        DigitsDemoConfig(mode="captions", task="ddpm").check()
    with pytest.raises(ValueError, match="task must be one of"):
        DigitsDemoConfig(task="edm").check()


def test_captions_run_rebuilds_from_its_config(tmp_path, monkeypatch):
    """Captions mode, with a tiny random BERT standing in for MiniLM (no download, no optional package)."""
    transformers = pytest.importorskip("transformers")
    from fastdit.text import CaptionEncoder

    path = tmp_path / "tiny_bert"
    path.mkdir()
    words = sorted({w for t in digits.CAPTION_TEMPLATES for w in t.split() if w != "{w}"} | set(digits.CLASS_WORDS))
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(str(path))
    bert = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, max_position_embeddings=80)
    transformers.BertModel(bert).save_pretrained(str(path))
    monkeypatch.setattr(digits, "_caption_encoder", lambda device: CaptionEncoder(path, device=str(device)))

    cfg = _tiny(tmp_path, mode="captions")
    digits.run(cfg)
    config, family, data, _ = _check_run(cfg.out_dir)
    assert family == "MMDiT" and config.model.name == "MMDiT-Tiny/2"
    assert config.model.options["caption_dim"] == 24
    assert config.data.options["caption_encoder"] == {"max_length": 16}
    assert config.task.options["caption_dropout"] == cfg.cond_dropout
    assert data["context"].shape == (len(data["x"]), 16, 24) and data["context_mask"].dtype == torch.bool


def _report(quick, got):
    return {"quick": quick, "samples_classified_as_requested": got, "target_classified_as_requested": 0.9,
            "classifier_held_out_accuracy": 0.98, "mean_nearest_train_distance_samples": 3.0,
            "mean_nearest_train_distance_held_out_real": 3.5,
            "files": {"grid": "out/samples.png", "samples": "out/samples.npz"}, "seconds_total": 12.0}


def test_summary_of_a_quick_run_makes_no_target_comparison():
    first = summary_lines(_report(True, 0.1))[0]
    assert "samples classified as the requested digit: 10.0%" in first
    assert "quick smoke run: figures are not meaningful" in first and "applies to the full demo" in first
    assert " met" not in first and "MISSED" not in first
    assert "(target" not in first


@pytest.mark.parametrize("got, verdict", [(0.93, "target 90%: met"), (0.9, "target 90%: met"),
                                          (0.5, "target 90%: MISSED")])
def test_summary_of_a_full_run_says_whether_the_target_was_met(got, verdict):
    lines = summary_lines(_report(False, got))
    assert verdict in lines[0] and "quick" not in lines[0]
    assert len(lines) == 3 and "held-out real digits 3.50" in lines[1]


def test_feature_metrics_on_synthetic_features():
    """The reporting function: samples drawn like the real digits score like the real yardstick; samples that
    collapse onto half the classes keep their precision but lose recall, in exactly the classes they miss."""
    rng = np.random.default_rng(np.random.randint(2**31))
    centres = 12.0 * np.eye(10)  # classes far apart (17 between centres, noise radius about 3)

    def draw(labels):
        return centres[labels] + rng.standard_normal((len(labels), 10))

    held_labels = np.repeat(np.arange(10), 31)
    held, reference = draw(held_labels), draw(np.repeat(np.arange(10), 17))
    good = digits.feature_metrics(draw(np.repeat(np.arange(10), 17)), reference, held, held_labels)
    assert good["fd_sample_count"] == 170 and good["precision_recall_k"] == 3
    assert 0.5 < good["fd_ratio"] < 2 and good["recall"] > 0.7 and good["precision"] > 0.7
    assert good["fd_real_train_vs_held_out"] == pytest.approx(
        frechet_distance(reference, held), rel=1e-12)
    assert sorted(good["recall_per_class"]) == [str(c) for c in range(10)]

    collapsed = digits.feature_metrics(draw(np.repeat(np.arange(5), 34)), reference, held, held_labels)
    assert collapsed["fd_ratio"] > 5 and collapsed["precision"] > 0.7 and collapsed["recall"] <= 0.5
    assert all(collapsed["recall_per_class"][str(c)] == 0 for c in range(5, 10))
    assert collapsed["recall"] == pytest.approx(np.mean(list(collapsed["recall_per_class"].values())))
    assert collapsed["fd_real_train_vs_held_out"] == good["fd_real_train_vs_held_out"]


def test_real_reference_matches_the_sample_class_counts():
    labels = torch.from_numpy(np.repeat(np.arange(10), 40))
    wanted = torch.arange(10).repeat_interleave(7)
    idx = digits.real_reference_indices(labels, wanted, seed=3)
    assert len(set(idx.tolist())) == 70 and np.array_equal(np.bincount(labels[idx].numpy()), np.full(10, 7))
    assert np.array_equal(idx, digits.real_reference_indices(labels, wanted, seed=3))
    with pytest.raises(ValueError, match="only 40 real training digits"):
        digits.real_reference_indices(labels, torch.zeros(41, dtype=torch.long), seed=0)


def _quality(report, quick, fd_ratio=1.4, recall=0.85):
    report = dict(report, quick=quick, fd_samples_vs_held_out=14.0 * fd_ratio / 1.4, fd_real_train_vs_held_out=10.0,
                  fd_ratio=fd_ratio, fd_sample_count=200, precision=0.9, recall=recall, precision_real_train=0.88,
                  recall_real_train=0.9, precision_recall_k=3, target_fd_ratio=2.0, target_recall=0.7,
                  recall_per_class={str(c): 0.8 for c in range(10)})
    report["quality_targets_met"] = None if quick else {"fd": fd_ratio <= 2.0, "recall": recall >= 0.7}
    return report


def test_summary_reports_fd_precision_recall():
    lines = summary_lines(_quality(_report(False, 0.97), quick=False))
    assert len(lines) == 6
    assert "200 samples 14.00, as many real training digits 10.00 (ratio 1.40) (target <= 2x: met)" in lines[2]
    assert "precision 0.90, recall 0.85 (target >= 0.7: met)" in lines[3]
    assert lines[4].startswith("recall per class: 0:0.80 1:0.80")
    missed = summary_lines(_quality(_report(False, 0.97), quick=False, fd_ratio=2.5, recall=0.6))
    assert "(target <= 2x: MISSED)" in missed[2] and "(target >= 0.7: MISSED)" in missed[3]
    quick = summary_lines(_quality(_report(True, 0.2), quick=True, fd_ratio=9.0, recall=0.1))
    assert "target" not in quick[2] and "target" not in quick[3]


def test_cli_passes_the_guidance_interval_and_the_default_scale(tmp_path, monkeypatch, capsys):
    from fastdit.cli import demo as demo_cli

    seen = []
    monkeypatch.setattr(digits, "run", lambda cfg: seen.append(cfg) or _quality(_report(False, 1.0), quick=False))
    assert demo_cli.main(["--out", str(tmp_path), "--guidance-interval", "0,0.6"]) == 0
    assert seen[0].guidance_interval == (0.0, 0.6) and seen[0].cfg_scale == DigitsDemoConfig().cfg_scale == 1.0
    assert "recall 0.85 (target >= 0.7: met)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="guidance-interval needs 0 <= LO <= HI <= 1"):
        demo_cli.main(["--out", str(tmp_path), "--guidance-interval", "0.7,0.2"])


def test_precision_applies_to_the_denoiser_only():
    """--precision fp8: the denoiser trains (and samples) in FP8; the autoencoder (no DiT blocks) keeps the
    device's default, so the switch never meets a model it cannot switch."""
    import torch

    from fastdit.demos.digits import DigitsDemoConfig, _trainer_config

    cfg = DigitsDemoConfig(out_dir="unused", precision="fp8")
    cpu = torch.device("cpu")
    assert _trainer_config(cfg, "denoiser", 10, 8, 1e-3, True, cpu).run.precision == "fp8"
    assert _trainer_config(cfg, "autoencoder", 10, 8, 1e-3, False, cpu).run.precision == "fp32"
    assert _trainer_config(DigitsDemoConfig(out_dir="unused"), "denoiser", 10, 8, 1e-3, True, cpu).run.precision \
        == "fp32"
