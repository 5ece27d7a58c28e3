"""Failing early and clearly: the output folder (required, a writable directory with room for the
checkpoints) is checked before any step; a save that runs out of space says so in one line; MFU only against
a known or given peak; the progress bar's final line is printed once."""
import collections
import errno
import os
import shutil
import time

import pytest
import torch

from fastdit.training import (CheckpointManager, CheckpointWriteError, ConfigError, RunConfig, Trainer,
                              load_state, read_jsonl)
from fastdit.training import metrics as metrics_mod
from fastdit.training import run_dir as run_dir_mod

Usage = collections.namedtuple("Usage", "total used free")


def _trainer(toy, cfg, task=None):
    return Trainer(cfg, toy.toy_model(), task or toy.NoisyTask(), toy.toy_dataset(cfg))


def _fit(toy, cfg, task=None):
    trainer = _trainer(toy, cfg, task)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def test_output_dir_is_required(toy):
    assert RunConfig().output_dir == ""
    cfg = toy.toy_config("")  # parsing and validate() accept it (e.g. for --print-config) ...
    with pytest.raises(ConfigError) as err:  # ... the trainer does not
        _trainer(toy, cfg)
    assert str(err.value) == ("run.output_dir is required: pass --output-dir DIR (or --set run.output_dir=DIR); "
                              "a run resumes from DIR when it holds checkpoints")


def test_output_dir_that_is_a_file_or_holds_a_checkpoints_file(toy, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"run.output_dir {tmp_path / 'file'} exists and is not a directory"):
        _trainer(toy, toy.toy_config(tmp_path / "file"))
    with pytest.raises(ConfigError, match=f"cannot create run.output_dir {tmp_path / 'file' / 'run'}: Not a directory"):
        _trainer(toy, toy.toy_config(tmp_path / "file" / "run"))  # a path under a file
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'run' / 'checkpoints'} exists and is not a directory"):
        _trainer(toy, toy.toy_config(tmp_path / "run"))


def test_unwritable_output_dir(toy, tmp_path, monkeypatch):
    # we run as root, which ignores permission bits: simulate the refusal a read-only folder gives
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(run_dir_mod.tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match=f"run.output_dir {tmp_path / 'run'} is not writable: cannot create a "
                                          r"file in .* \(Permission denied\)"):
        _trainer(toy, toy.toy_config(tmp_path / "run"))


def test_too_little_free_space_for_the_checkpoints(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    cfg = toy.toy_config(tmp_path / "run")  # checkpoints every 4 of 12 steps: two coexist while saving
    one = run_dir_mod.checkpoint_size_estimate(cfg, toy.toy_model())
    params = sum(p.numel() * p.element_size() for p in toy.toy_model().parameters())
    assert one >= params * 4  # model, two AdamW moments, EMA
    with pytest.raises(ConfigError) as err:
        _trainer(toy, cfg)
    text = str(err.value)
    assert f"not enough free space for checkpoints in {tmp_path / 'run' / 'checkpoints'}" in text
    assert f"about {2 * one} bytes" in text and "1000 bytes" in text and "previous one is kept" in text
    # no checkpoints to write: no space needed
    _trainer(toy, toy.toy_config(tmp_path / "nock", **{"checkpoint.every": 0, "checkpoint.save_final": False})).close()


def _state(step):
    return {"format": 1, "step": step, "model": {"w": torch.zeros(1000)}}


@pytest.mark.parametrize("error,free,expect", [
    (OSError(errno.ENOSPC, "No space left on device"), 10**12, "no space left on device at {dir} (needed about"),
    (RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), 10, "no space left on device at {dir} (needed about"),
    (RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), 10**12, "cannot write checkpoint at {dir}: file write failed"),
    (OSError(errno.EIO, "Input/output error"), 10**12, "cannot write checkpoint at {dir}: Input/output error"),
])
def test_a_failed_save_raises_a_checkpoint_write_error(tmp_path, monkeypatch, error, free, expect):
    m = CheckpointManager(str(tmp_path), keep_last=2)
    good = m.save(1, _state(1), "{}")

    def fail(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise error
    monkeypatch.setattr(torch, "save", fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**13, 0, free))
    with pytest.raises(CheckpointWriteError) as err:
        m.save(2, _state(2), "{}")
    text = str(err.value)
    assert text.startswith(expect.format(dir=tmp_path))
    assert "inline_container" not in text and "enforce fail" not in text and "\n" not in text
    if "no space" in expect:
        assert err.value.errno == errno.ENOSPC and err.value.needed >= 4000
        assert text.endswith(f"{err.value.needed} bytes, {free} free)")
    assert isinstance(err.value, OSError) and err.value.__suppress_context__
    assert m.latest() == good and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_the_trainer_surfaces_a_full_disk_on_save(toy, tmp_path, monkeypatch):
    real = torch.save

    def full(obj, path, *args, **kwargs):
        if isinstance(path, str) and path.endswith("state.pt") and obj.get("step") == 8:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 448 vs 384 "
                               "file write failed: No space left on device")
        return real(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError, match=r"^no space left on device at .*checkpoints \(needed about"):
        _fit(toy, toy.toy_config(tmp_path))
    assert CheckpointManager(str(tmp_path / "checkpoints")).latest().endswith("step_000000004")
    events = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "checkpoint_failed"]
    assert len(events) == 1 and events[0]["step"] == 8 and "no space left" in events[0]["error"]


def test_mfu_needs_a_known_or_given_peak(toy, tmp_path, monkeypatch):
    _fit(toy, toy.toy_config(tmp_path / "a", **{"run.max_steps": 2}))
    records = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "event" not in r]
    assert records and all("tflops" in r and "mfu" not in r for r in records)  # CPU: peak unknown
    _fit(toy, toy.toy_config(tmp_path / "b", **{"run.max_steps": 2, "logging.peak_tflops": 100}))
    records = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "event" not in r]
    assert all(r["mfu"] == pytest.approx(r["tflops"] / 100) for r in records)
    assert "mfu" not in metrics_mod.throughput(steps=1, seconds=1.0, batch_size=2, world_size=1,
                                               flops_per_sample=1e9, peak_tflops=None)
    assert metrics_mod.known_peak_tflops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-80GB", None), ("NVIDIA H200", 989.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert metrics_mod.known_peak_tflops(torch.device("cuda", 0)) == peak


def test_the_final_progress_bar_line_is_printed_once(toy, tmp_path, capfd):
    class Slow(toy.NoisyTask):  # slower than tqdm's 0.1 s redraw interval, so every update may draw
        def loss(self, model, batch):
            time.sleep(0.11)
            return super().loss(model, batch)
    cfg = toy.toy_config(tmp_path, **{"run.max_steps": 3, "logging.progress_bar": True})
    trainer = _trainer(toy, cfg, Slow())
    capfd.readouterr()
    try:
        trainer.fit()
    finally:
        trainer.close()
    err = capfd.readouterr().err
    assert err.count("3/3") == 1, err
    assert err.count("2/3") >= 1 and err.endswith("\n")
    assert load_state(trainer.checkpoints.latest())["step"] == 3
