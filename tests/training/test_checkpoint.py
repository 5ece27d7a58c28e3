import argparse
import os

import pytest
import torch

from fastdit.training import CheckpointManager, load_state, resolve_checkpoint
from fastdit.training import checkpoint as ckpt_mod


def _state(step):
    return {"format": 1, "step": step, "model": {"w": torch.full((3,), float(step))}}


def test_save_writes_complete_checkpoints_and_moves_latest(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=2)
    assert m.latest() is None
    for step in (10, 20, 30):
        path = m.save(step, _state(step), '{"run": {}}', exports={"model": {"w": torch.ones(3)}})
        assert m.latest() == path and os.path.basename(path) == f"step_{step:09d}"
        assert (tmp_path / "latest").read_text().strip() == os.path.basename(path)
    assert [s for s, _ in m.complete()] == [20, 30]  # keep_last=2
    assert sorted(os.listdir(tmp_path / "step_000000030")) == ["config.json", "manifest.json", "model.safetensors",
                                                              "state.pt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    assert load_state(m.latest())["step"] == 30
    assert resolve_checkpoint(str(tmp_path)) == m.latest()


def test_a_crash_before_the_rename_leaves_the_previous_latest(tmp_path, monkeypatch):
    m = CheckpointManager(str(tmp_path), keep_last=1)
    good = m.save(1, _state(1), "{}")

    def crash(src, dst):
        raise KeyboardInterrupt("killed between the temp write and the rename")
    monkeypatch.setattr(ckpt_mod, "_rename", crash)
    with pytest.raises(KeyboardInterrupt):
        m.save(2, _state(2), "{}")
    assert m.latest() == good and load_state(good)["step"] == 1
    assert [s for s, _ in m.complete()] == [1]


def test_a_leftover_temp_folder_is_never_latest_and_is_cleaned(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=3)
    good = m.save(5, _state(5), "{}")
    half = tmp_path / ".tmp-step_000000006-deadbeef"  # what a SIGKILL mid-save leaves
    half.mkdir()
    (half / "state.pt").write_bytes(b"torn")
    (tmp_path / "step_000000007").mkdir()  # a folder without state.pt is not a checkpoint either
    assert m.latest() == good
    m.remove_temporaries()
    assert not half.exists()


def test_stale_pointer_falls_back_to_newest_complete(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=3)
    m.save(1, _state(1), "{}")
    second = m.save(2, _state(2), "{}")
    (tmp_path / "latest").write_text("step_000000009\n")  # names a checkpoint that is not there
    assert m.latest() == second
    (tmp_path / "latest").unlink()
    assert m.latest() == second


def test_keep_last_never_deletes_the_newest(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=1)
    for step in range(1, 5):
        m.save(step, _state(step), "{}")
        assert [s for s, _ in m.complete()] == [step]
    # latest pointing at an older checkpoint (a resume from it) keeps that one as well
    m.save(2, _state(2), "{}")
    assert [s for s, _ in m.complete()] == [2, 4]
    assert m.latest().endswith("step_000000002")


def test_resave_of_an_existing_step_replaces_it(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=3)
    m.save(3, _state(3), "{}")
    m.save(3, {**_state(3), "model": {"w": torch.zeros(3)}}, "{}")
    assert torch.equal(load_state(m.latest())["model"]["w"], torch.zeros(3))


def test_load_refuses_pickled_objects_and_foreign_files(tmp_path):
    torch.save({"format": 1, "obj": argparse.Namespace(a=1)}, tmp_path / "state.pt")  # an arbitrary object
    with pytest.raises(Exception, match="[Ww]eights"):
        load_state(str(tmp_path))
    torch.save({"something": 1}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not a fastdit checkpoint"):
        load_state(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "nowhere"))
