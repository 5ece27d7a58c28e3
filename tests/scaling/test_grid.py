"""`fastdit scaling` end to end on the CPU with tiny models and a few steps: a 2×2 grid writes scaling.json and
scaling.png with every point's loss, FD, FLOPs and wall time; a second invocation retrains nothing; a point
that diverges is recorded as such and left out of the fits; bad grid specs and a folder of another grid are
refused with a message; --dry-run prints the plan and trains nothing."""
import importlib.util
import json
import os
import shutil

import pytest

from fastdit.cli import main
from fastdit.models import DiTConfig
from fastdit.scaling import study
from fastdit.scaling.spec import GridError, parse_budgets, parse_size, parse_sizes

HAVE_METRICS = importlib.util.find_spec("fastdit.metrics") is not None

# tiny: a 20-step autoencoder, DiTs of 31k / 105k parameters, 4 and 8 steps, FD on 60 four-step samples
TINY = ["--sizes", "32x1,64x1", "--steps", "4,8", "--ae-steps", "20", "--fd-samples", "60", "--sample-steps", "4",
        "--batch-size", "32", "--estimate-steps", "1", "--threads", "1", "--device", "cpu", "--no-progress"]


def _args(out, *extra, sizes=None):
    args = list(TINY)
    if sizes is not None:
        args[1] = sizes
    return ["scaling", "--out", str(out), *args, *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One 2×2 grid run (shared; tests that run again work on a copy of its folder)."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("scaling") / "grid"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(_args(out)) == 0
    return out, buf.getvalue()


def _copy(first_run, tmp_path):
    out = tmp_path / "grid"
    shutil.copytree(first_run[0], out)
    return out


def _report(out):
    return json.loads((out / "scaling.json").read_text())


def test_two_by_two_grid_runs_end_to_end(first_run):
    out, printed = first_run
    # the plan came first: every point with its FLOPs, and an estimate
    assert "2 size(s) x 2 budget(s) = 4 points" in printed and "estimated wall time" in printed
    assert printed.index("estimated wall time") < printed.index("training the digits autoencoder")
    report = _report(out)
    assert (out / "scaling.png").stat().st_size > 10_000
    points = {p["key"]: p for p in report["points"]}
    assert sorted(points) == ["h32-d1_s4", "h32-d1_s8", "h64-d1_s4", "h64-d1_s8"]
    for key, p in points.items():
        assert p["status"] == "ok", p
        hidden = 32 if key.startswith("h32") else 64
        model = DiTConfig(input_size=4, in_channels=4, patch_size=1, hidden_size=hidden, depth=1,
                          num_heads=max(1, hidden // 32), num_classes=10, learn_sigma=False)
        from fastdit.models import dit_flops, training_flops
        assert p["flops_per_sample"] == training_flops(dit_flops(model))  # the FLOP counter's figure
        assert p["train_flops"] == p["flops_per_sample"] * 32 * p["steps"]
        assert 0 < p["held_out_loss"] < 10
        if HAVE_METRICS:
            assert p["fd"] > 0 and 0 <= p["precision"] <= 1 and 0 <= p["recall"] <= 1
        else:  # FD needs fastdit.metrics: without it the points say so
            assert p["fd"] is None and "fastdit.metrics" in p["fd_note"]
        assert p["wall_seconds"] > 0 and p["train_seconds"] > 0
        assert (out / "points" / key / "result.json").exists()
    assert report["grid"]["budgets_steps"] == [4, 8] and report["grid"]["global_batch"] == 32
    if HAVE_METRICS:  # the yardstick: real training digits at the same count and class balance
        reference = report["grid"]["evaluation"]["fd_real_reference"]
        assert 0 < reference["fd"] < min(p["fd"] for p in points.values()) and "60 real" in reference["what"]
    assert [s["key"] for s in report["grid"]["sizes"]] == ["h32-d1", "h64-d1"]
    assert report["excluded"] == [] and sorted(report["trained_now"]) == sorted(points)
    fits = report["fits"]
    assert set(fits) >= {"loss_frontier", "loss_per_size"} | ({"fd_frontier"} if HAVE_METRICS else set())
    # two budgets per size: too few points for a per-size fit, and the entry says so
    assert all(e["fit"] is None and "at least 3" in e["error"] for e in fits["loss_per_size"].values())
    frontier = fits["loss_frontier"]
    assert frontier["points"] and set(frontier["points"]) <= set(points)
    assert frontier["fit"] is not None or frontier["error"]
    # the digits cache: autoencoder and latents trained once, in data/
    assert (out / "data" / "data.json").exists() and (out / "data" / "held_out.pt").exists()
    assert "wrote" in printed and "loss frontier" in printed


def test_second_invocation_retrains_nothing(first_run, tmp_path, monkeypatch, capsys):
    out = _copy(first_run, tmp_path)
    before = {p: os.stat(p).st_mtime_ns for p in out.glob("points/*/result.json")}
    ae_before = os.stat(out / "data" / "autoencoder.pt").st_mtime_ns

    def no_training(self, point):
        raise AssertionError(f"{point.key} was trained again")

    monkeypatch.setattr(study.Study, "run_point", no_training)
    assert main(_args(out)) == 0
    printed = capsys.readouterr().out
    assert "0 point(s) trained now" in printed and printed.count(" done") == 4
    assert {p: os.stat(p).st_mtime_ns for p in out.glob("points/*/result.json")} == before
    assert os.stat(out / "data" / "autoencoder.pt").st_mtime_ns == ae_before
    assert len(_report(out)["points"]) == 4


def test_divergent_point_is_recorded_and_left_out_of_the_fits(first_run, tmp_path, capsys):
    out = _copy(first_run, tmp_path)
    # the grid grows by one size with an absurd learning rate: only its two points train, and both diverge
    assert main(_args(out, sizes="32x1,64x1,48x1:lr=1e30")) == 0
    printed = capsys.readouterr().out
    report = _report(out)
    bad = sorted(p["key"] for p in report["points"] if p["status"] != "ok")
    assert bad == ["h48-d1-lr1e+30_s4", "h48-d1-lr1e+30_s8"]
    assert sorted(report["trained_now"]) == bad
    for key in bad:
        p = next(p for p in report["points"] if p["key"] == key)
        assert p["status"] == "diverged" and "non-finite" in p["reason"] and p.get("held_out_loss") is None
        assert json.loads((out / "points" / key / "result.json").read_text())["status"] == "diverged"
    assert sorted(e["key"] for e in report["excluded"]) == bad
    used = set(report["fits"]["loss_frontier"]["points"])
    used |= set(report["fits"].get("fd_frontier", {}).get("points", []))
    for entry in report["fits"]["loss_per_size"].values():
        used |= set(entry["points"])
    assert not used & set(bad)
    assert report["fits"]["loss_per_size"]["h48-d1-lr1e+30"]["excluded"] == bad
    assert sum("diverged" in n and "left out of the fits" in n for n in report["notes"]) == 2
    assert "diverged" in printed and "left out of the fits" in printed  # in the printed summary too


def test_a_folder_of_another_grid_is_refused(first_run, tmp_path, capsys):
    out = _copy(first_run, tmp_path)
    args = _args(out)
    args[args.index("--batch-size") + 1] = "16"
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(_args(out, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "4 points" in printed and "estimated wall time" in printed and "train FLOPs" in printed
    assert "with the autoencoder (20 steps" in printed  # not trained yet: its time is estimated too
    assert not (out / "points").exists() and not (out / "data" / "autoencoder.pt").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--sizes", "", "no model sizes"),
    ("--sizes", "32", "is not HxD"),
    ("--sizes", "30x2", "divisible by 4"),
    ("--sizes", "64x2x3", "divisible"),
    ("--sizes", "64x0", "depth and heads >= 1"),
    ("--sizes", "64x2,64x2", "given twice"),
    ("--sizes", "MMDiT-S/2", "is an MMDiT"),
    ("--sizes", "64x2:lr=-1", "positive finite"),
    ("--sizes", "64x2:wd=0.1", "only per-size option"),
    ("--steps", "", "no training budgets"),
    ("--steps", "100,abc", "not a number"),
    ("--steps", "100,0", "positive whole"),
    ("--steps", "100,2.5", "positive whole"),
    ("--steps", "100,100", "given twice"),
    ("--batch-size", "0", "batch_size must be >= 1"),
])
def test_bad_grid_specs_exit_with_a_message(tmp_path, flag, value, message, capsys):
    args = _args(tmp_path / "bad", "--dry-run")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_size_and_budget_parsing():
    assert parse_size("64x3").model_options() == {"hidden_size": 64, "depth": 3, "num_heads": 2}
    assert parse_size("64x3x4").key == "h64-d3-n4" and parse_size("64x3x2").key == "h64-d3"
    s = parse_size("DiT-S/2:lr=3e-4")
    assert s.preset == "DiT-S/2" and s.lr == 3e-4 and s.key == "DiT-S-2-lr0.0003" and s.model_options() == {}
    assert [x.key for x in parse_sizes("32x2, 64x3")] == ["h32-d2", "h64-d3"]
    assert parse_budgets("400,100, 200") == [100, 200, 400]
    with pytest.raises(GridError, match="given twice"):
        parse_sizes("64x2,64x2x2")  # the same model (2 heads is the default for 64)


def _train_config(tmp_path, data):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({
        "model": {"name": "DiT-S/2", "options": {"patch_size": 1, "learn_sigma": False}},
        "data": {"batch_size": 8, "num_classes": 10, **data},
        "run": {"precision": "fp32"}, "logging": {"tensorboard": False}, "checkpoint": {"every": 0}}))
    return str(path)


def test_a_configured_study_trains_on_its_data_and_reports_the_loss(tmp_path, capsys):
    config = _train_config(tmp_path, {"kind": "synthetic", "latent_shape": [4, 4, 4]})
    out = tmp_path / "configured"
    assert main(["scaling", "--out", str(out), "--config", config, "--sizes", "32x1,48x1", "--steps", "2,3",
                 "--threads", "1", "--device", "cpu", "--no-progress", "--estimate-steps", "0"]) == 0
    assert "not measured" in capsys.readouterr().out
    report = _report(out)
    assert [p["status"] for p in report["points"]] == ["ok"] * 4
    assert all(p.get("fd") is None and p["held_out_loss"] > 0 for p in report["points"])
    assert "fd_frontier" not in report["fits"] and any("FD is measured on the digits" in n for n in report["notes"])
    assert not (out / "data").exists()  # no digits cache for configured data
    # presets take their own sizes (planned on the meta device: nothing is allocated or trained)
    assert main(["scaling", "--out", str(tmp_path / "plan"), "--config", config, "--sizes", "32x1,DiT-S/2,DiT-B/2",
                 "--steps", "10", "--dry-run", "--estimate-steps", "0"]) == 0
    printed = capsys.readouterr().out
    assert "DiT-S/2" in printed and "32.5M" in printed and "130M" in printed and "decades" in printed


def test_memory_data_needs_a_held_out_file(tmp_path, capsys):
    import torch

    latents = tmp_path / "latents.pt"
    torch.save({"x": torch.randn(20, 4, 4, 4), "y": torch.randint(0, 10, (20,))}, latents)
    config = _train_config(tmp_path, {"kind": "memory", "path": str(latents)})
    assert main(["scaling", "--out", str(tmp_path / "o"), "--config", config, "--sizes", "32x1", "--steps", "2",
                 "--dry-run", "--estimate-steps", "0"]) == 2
    assert "--held-out FILE is needed" in capsys.readouterr().err
    torch.save({"x": torch.randn(6, 4, 4, 4), "y": torch.randint(0, 10, (6,))}, tmp_path / "held.pt")
    assert main(["scaling", "--out", str(tmp_path / "o"), "--config", config, "--sizes", "32x1", "--steps", "2",
                 "--dry-run", "--estimate-steps", "0", "--held-out", str(tmp_path / "held.pt")]) == 0
    assert "6 latents of" in capsys.readouterr().out


def test_a_point_interrupted_after_training_resumes_from_its_checkpoint(first_run, tmp_path):
    out = _copy(first_run, tmp_path)
    (out / "points" / "h64-d1_s8" / "result.json").unlink()  # as if stopped between training and evaluation
    assert main(_args(out)) == 0
    report = _report(out)
    assert report["trained_now"] == ["h64-d1_s8"]
    point = next(p for p in report["points"] if p["key"] == "h64-d1_s8")
    assert point["status"] == "ok" and point["resumed_from"] and "resumed" in point["note"]
    before = next(p for p in _report(first_run[0])["points"] if p["key"] == "h64-d1_s8")
    assert point["held_out_loss"] == pytest.approx(before["held_out_loss"], rel=1e-6)  # same weights, same draws


def test_fp8_points_train_in_fp8_and_never_stand_in_for_the_folders_other_points(first_run, tmp_path, capsys):
    """--precision fp8 in a folder of fp32 points: refused (the points would not be comparable); in its own
    folder (the digits data copied, so no autoencoder is retrained) the grid trains with FP8 GEMMs."""
    out = _copy(first_run, tmp_path)
    assert main(_args(out, "--precision", "fp8")) == 2
    assert "precision differ" in capsys.readouterr().err
    fp8 = tmp_path / "fp8"
    shutil.copytree(out / "data", fp8 / "data")
    assert main(_args(fp8, "--precision", "fp8", "--no-fd")) == 0
    report = _report(fp8)
    assert len(report["points"]) == 4 and all(p["status"] == "ok" for p in report["points"])
    assert all(p["spec"]["precision"] == "fp8" for p in report["points"])
    # the same sizes, steps and data as the fp32 grid: the held-out losses are of the same order
    fp32 = {p["key"]: p["held_out_loss"] for p in _report(first_run[0])["points"]}
    for p in report["points"]:
        assert 0.5 < p["held_out_loss"] / fp32[p["key"]] < 2.0, (p["key"], p["held_out_loss"], fp32[p["key"]])


def test_a_point_cut_short_in_training_resumes_from_a_checkpoint_on_the_way(first_run, tmp_path, monkeypatch):
    """--checkpoint-every 4: the 8-step point saves at step 4. Killed right after that save (the process dies:
    nothing after it runs), the next invocation resumes it at step 4 and ends with the weights of the
    uninterrupted run (exact resume: the same held-out loss as the first run's)."""
    from fastdit.training import Trainer

    class Killed(BaseException):
        pass

    save = Trainer.save_checkpoint

    def save_then_die(self, step):
        path = save(self, step)
        if step == 4 and self.config.run.output_dir.endswith("h64-d1_s8"):
            raise Killed
        return path

    out = tmp_path / "grid"
    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main(_args(out, "--checkpoint-every", "4", sizes="64x1"))
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    run = out / "points" / "h64-d1_s8"
    assert not (run / "result.json").exists()
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_000000004"]
    assert main(_args(out, "--checkpoint-every", "4", sizes="64x1")) == 0
    report = _report(out)
    assert report["trained_now"] == ["h64-d1_s8"]
    point = next(p for p in report["points"] if p["key"] == "h64-d1_s8")
    assert point["status"] == "ok" and "step_000000004" in str(point["resumed_from"])
    before = next(p for p in _report(first_run[0])["points"] if p["key"] == "h64-d1_s8")
    assert point["held_out_loss"] == pytest.approx(before["held_out_loss"], rel=1e-6)


def test_checkpoint_every_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_args(tmp_path / "o", "--checkpoint-every", "0", "--dry-run"))
    assert "checkpoint_every must be >= 1" in capsys.readouterr().err
