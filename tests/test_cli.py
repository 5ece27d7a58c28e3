import json

import numpy as np
import pytest

from fastdit.cli import main


def test_demo_quick_run_writes_the_grid_samples_and_report(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--device", "cpu", "--out", str(out_dir)]) == 0
    assert "samples classified as the requested digit" in capsys.readouterr().out
    report = json.loads((out_dir / "report.json").read_text())
    assert 0.0 <= report["samples_classified_as_requested"] <= 1.0
    assert report["classifier_held_out_accuracy"] > 0.9  # an SVC on real digits: a sanity check of the split
    assert (out_dir / "samples.png").stat().st_size > 0
    with np.load(out_dir / "samples.npz") as saved:
        assert saved["images"].shape == (30, 1, 16, 16)
        assert saved["labels"].tolist() == [c for c in range(10) for _ in range(3)]
    # both stages checkpointed: a second run resumes at the last step instead of training again
    assert (out_dir / "autoencoder" / "checkpoints" / "latest").exists()
    assert (out_dir / "denoiser" / "checkpoints" / "latest").exists()
    # the demo's folder is a run `fastdit sample` can use: it finds the denoiser, rebuilds it from its
    # config.json and decodes through the autoencoder the run used
    assert main(["sample", str(out_dir), "--steps", "2", "--classes", "3,7", "--num-per-class", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    with np.load(next((out_dir / "denoiser" / "samples").glob("sample_step_*.npz"))) as drawn:
        assert drawn["images"].shape == (4, 1, 16, 16) and drawn["labels"].tolist() == [3, 3, 7, 7]


def test_demo_quick_ddpm_run_writes_a_report_with_its_task(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--task", "ddpm", "--no-progress", "--device", "cpu", "--out", str(out_dir)]) == 0
    assert "DDPM (learned variance) steps" in capsys.readouterr().out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["task"] == "ddpm" and report["config"]["task"] == "ddpm"
    assert report["sampling"]["sampler"] == "ddpm" and report["sampling"]["variance"] == "learned_range"
    assert 0.0 <= report["samples_classified_as_requested"] <= 1.0
    config = json.loads((out_dir / "denoiser" / "config.json").read_text())
    assert config["task"]["name"] == "ddpm" and config["model"]["options"]["learn_sigma"] is True
    with np.load(out_dir / "samples.npz") as saved:
        assert saved["images"].shape == (30, 1, 16, 16) and np.isfinite(saved["images"]).all()


def test_info_reports_versions_and_op_paths(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["default_backend"] == "auto"
    assert info["op_paths (bf16 inputs)"]["adaln_modulate"] == "reference"  # CPU: no kernel under auto
    assert set(info["op_paths (bf16 inputs)"]) == {"adaln_modulate", "gated_residual_adaln", "rms_norm",
                                                   "rope", "qk_norm_rope", "joint_attention",
                                                   "linear_gelu (inference; Mlp takes it under triton)",
                                                   "fp8_linear (precision=fp8)"}
    assert info["op_paths (bf16 inputs)"]["fp8_linear (precision=fp8)"] == "torch._scaled_mm"  # CPU runs it too
    assert info["op_paths (bf16 inputs)"]["linear_gelu (inference; Mlp takes it under triton)"].startswith("reference")
    from fastdit.ops._common import traceable_kernels
    expected = "triton_op" if traceable_kernels() else "opaque custom ops"
    assert expected in info["under torch.compile"] and "auto takes the elementwise ops only" in \
        info["under torch.compile"]


@pytest.mark.parametrize("argv,message", [
    (["demo", "--dit-steps", "0"], "--dit-steps must be at least 1"),
    (["demo", "--mode", "pixels"], "invalid choice"),
    (["demo", "--task", "edm"], "invalid choice"),
    (["demo", "--mode", "captions", "--task", "ddpm"], "the captions mode trains with rectified flow only"),
    (["demo", "--backend", "fast"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    captured = capsys.readouterr()
    assert message in (captured.err + captured.out + str(exc.value.code))
