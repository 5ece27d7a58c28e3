"""Checkpoint manifests and validation: damaged checkpoints are named and skipped, never loaded; checkpoints
older than manifests still load; weights are stored once unless the safetensors export is asked for."""
import argparse
import hashlib
import json
import os
import pickle
import struct

import pytest
import torch

from fastdit.training import (CheckpointError, CheckpointManager, load_state, load_weights, read_jsonl,
                              resolve_checkpoint, save_safetensors, validate_checkpoint)

STEP = "step_{:09d}".format


def _state(step, n=256):
    return {"format": 1, "step": step, "model": {"w": torch.full((n,), float(step)), "b": torch.zeros(3)},
            "ema": {"decay": 0.9, "warmup": True, "num_updates": step, "shadow": {"w": torch.full((n,), -1.0)}}}


def _exports(step, n=256):
    model = {"w": torch.full((n,), float(step)), "b": torch.zeros(3)}
    return {"model": model, "ema": {**model, "w": torch.full((n,), -1.0)}}


@pytest.fixture
def two(tmp_path):
    """A manager with two intact checkpoints (the newer one with safetensors exports)."""
    m = CheckpointManager(str(tmp_path), keep_last=5)
    old = m.save(1, _state(1), '{"run": {}}')
    new = m.save(2, _state(2), '{"run": {}}', exports=_exports(2))
    return m, old, new


def _truncate(path, keep=None):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2 if keep is None else keep])


def _garble(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x5A  # one byte, same size
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "truncated state.pt": (lambda p: _truncate(os.path.join(p, "state.pt")), "size mismatch of state.pt"),
    "empty state.pt": (lambda p: _truncate(os.path.join(p, "state.pt"), 0), "size mismatch of state.pt"),
    "truncated ema.safetensors": (lambda p: _truncate(os.path.join(p, "ema.safetensors")),
                                  "size mismatch of ema.safetensors"),
    "one garbled byte": (lambda p: _garble(os.path.join(p, "state.pt")), "checksum mismatch of state.pt"),
    "deleted manifest": (lambda p: os.remove(os.path.join(p, "manifest.json")), "missing file manifest.json"),
    "deleted state.pt": (lambda p: os.remove(os.path.join(p, "state.pt")), "missing file state.pt"),
    "garbled manifest": (lambda p: open(os.path.join(p, "manifest.json"), "w").write("{not json"),
                         "unreadable manifest.json"),
}


def test_save_writes_a_manifest_of_every_other_file(two):
    m, old, new = two
    manifest = json.load(open(os.path.join(new, "manifest.json")))
    assert manifest["format"] == 1 and manifest["step"] == 2
    assert sorted(manifest["files"]) == ["config.json", "ema.safetensors", "model.safetensors", "state.pt"]
    for name, entry in manifest["files"].items():
        data = open(os.path.join(new, name), "rb").read()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    validate_checkpoint(new)
    validate_checkpoint(old)
    assert m.latest() == new


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_named_and_latest_falls_back_with_a_warning(two, damage):
    m, old, new = two
    hurt, problem = DAMAGE[damage]
    hurt(new)
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(new)
    assert new in str(err.value) and problem in str(err.value)
    with pytest.warns(RuntimeWarning, match="skipping damaged checkpoint") as caught:
        assert m.latest() == old
    message = str(caught[0].message)
    assert new in message and problem in message
    # a run or checkpoints dir resolves to the older intact one; the damaged folder named explicitly is an error
    with pytest.warns(RuntimeWarning, match=STEP(2)):
        assert resolve_checkpoint(m.directory) == old
    with pytest.raises(CheckpointError, match=problem):
        resolve_checkpoint(new)


def test_no_valid_checkpoint_is_an_error_listing_them(two):
    m, old, new = two
    _truncate(os.path.join(old, "state.pt"))
    _garble(os.path.join(new, "state.pt"))
    with pytest.raises(CheckpointError) as err:
        m.latest()
    text = str(err.value)
    assert "no valid checkpoint in" in text and old in text and new in text
    assert "size mismatch of state.pt" in text and "checksum mismatch of state.pt" in text
    with pytest.raises(CheckpointError):
        resolve_checkpoint(m.directory)


def _legacy(folder, step, exports=True):
    """A checkpoint as written before manifests existed."""
    os.makedirs(folder)
    torch.save(_state(step), os.path.join(folder, "state.pt"))
    open(os.path.join(folder, "config.json"), "w").write("{}")
    if exports:
        for name, tensors in _exports(step).items():
            save_safetensors(tensors, os.path.join(folder, f"{name}.safetensors"))
    return str(folder)


def test_checkpoints_without_a_manifest_still_validate_and_load(tmp_path):
    legacy = _legacy(tmp_path / "ck" / STEP(3), 3)
    validate_checkpoint(legacy)
    assert CheckpointManager(str(tmp_path / "ck")).latest() == legacy
    weights, which = load_weights(legacy)
    assert which == "ema" and torch.equal(weights["w"], torch.full((256,), -1.0))
    assert load_weights(legacy, use_ema=False)[1] == "model"
    _truncate(os.path.join(legacy, "ema.safetensors"))
    with pytest.raises(CheckpointError, match="ema.safetensors is not a complete safetensors file"):
        validate_checkpoint(legacy)
    os.remove(os.path.join(legacy, "ema.safetensors"))
    _truncate(os.path.join(legacy, "state.pt"))
    with pytest.raises(CheckpointError, match="not a fastdit checkpoint or unsafe pickle"):
        validate_checkpoint(legacy)


def test_a_pickle_payload_is_refused_with_a_clear_error(tmp_path):
    folder = tmp_path / STEP(1)
    folder.mkdir()
    (folder / "state.pt").write_bytes(pickle.dumps({"format": 1, "step": 1}))
    with pytest.raises(CheckpointError, match="not a fastdit checkpoint or unsafe pickle: .*state.pt") as err:
        load_state(str(folder))
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    torch.save({"format": 1, "obj": argparse.Namespace(a=1)}, folder / "state.pt")
    with pytest.raises(CheckpointError, match=r"unsafe pickle: .*\(weights_only refused it: .*argparse.Namespace"):
        load_state(str(folder))
    with pytest.raises(CheckpointError, match="not a fastdit checkpoint or unsafe pickle"):
        validate_checkpoint(str(folder))
    (folder / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a fastdit checkpoint or unsafe pickle"):
        load_state(str(folder))


def test_load_weights_reads_state_pt_without_exports_and_names_bad_safetensors(two, tmp_path):
    m, old, new = two
    weights, which = load_weights(old)  # no exports: from state.pt, EMA shadow over the model
    assert which == "ema" and torch.equal(weights["w"], torch.full((256,), -1.0)) and "b" in weights
    weights, which = load_weights(old, use_ema=False)
    assert which == "model" and torch.equal(weights["w"], torch.full((256,), 1.0))
    assert load_weights(new)[1] == "ema" and load_weights(m.directory)[1] == "ema"  # a checkpoints dir too
    _truncate(os.path.join(new, "ema.safetensors"))
    with pytest.raises(CheckpointError, match="size mismatch of ema.safetensors"):
        load_weights(new)
    # a header that parses and fits the file but that safetensors refuses: the raw SafetensorError is wrapped
    legacy = _legacy(tmp_path / "legacy", 5, exports=False)
    header = json.dumps({"w": {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}}).encode()
    open(os.path.join(legacy, "ema.safetensors"), "wb").write(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match=r"invalid checkpoint .*legacy: cannot read ema.safetensors"):
        load_weights(legacy)


def test_resume_auto_skips_a_damaged_newest_checkpoint(toy, tmp_path, capfd):
    toy.fit(toy.toy_config(tmp_path, **{"run.max_steps": 8, "checkpoint.every": 4, "checkpoint.keep_last": 3}))
    bad = str(tmp_path / "checkpoints" / STEP(8))
    _truncate(os.path.join(bad, "state.pt"))
    capfd.readouterr()
    resumed = toy.fit(toy.toy_config(tmp_path, **{"run.max_steps": 10, "checkpoint.every": 4,
                                                     "checkpoint.keep_last": 3}))
    assert resumed.resumed_from.endswith(STEP(4)) and resumed.step == 10
    err = capfd.readouterr().err
    assert "skipping damaged checkpoint" in err and bad in err and "size mismatch of state.pt" in err
    events = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "warning"]
    assert len(events) == 1 and bad in events[0]["message"]


def test_resume_auto_with_only_damaged_checkpoints_is_an_error(toy, tmp_path):
    toy.fit(toy.toy_config(tmp_path, **{"run.max_steps": 8, "checkpoint.every": 4, "checkpoint.keep_last": 3}))
    for step in (4, 8):
        _garble(str(tmp_path / "checkpoints" / STEP(step) / "state.pt"))
    with pytest.raises(CheckpointError, match="no valid checkpoint in .*checkpoints: .*checksum mismatch"):
        toy.fit(toy.toy_config(tmp_path, **{"run.max_steps": 10}))
    # an explicitly named damaged checkpoint: an error, no fallback to another one
    toy.fit(toy.toy_config(tmp_path / "other", **{"run.max_steps": 4}))
    explicit = str(tmp_path / "checkpoints" / STEP(8))
    with pytest.raises(CheckpointError, match="checksum mismatch of state.pt"):
        toy.fit(toy.toy_config(tmp_path / "new", **{"checkpoint.resume": explicit}))


def test_weights_are_stored_once_by_default(toy, tmp_path):
    trainer = toy.fit(toy.toy_config(tmp_path / "a", **{"run.max_steps": 4}))
    folder = trainer.checkpoints.latest()
    names = sorted(os.listdir(folder))
    assert names == ["config.json", "manifest.json", "state.pt"]
    sizes = {n: os.path.getsize(os.path.join(folder, n)) for n in names}
    assert sum(sizes.values()) - sizes["state.pt"] < 16 * 1024  # only small metadata beside state.pt
    weights, which = load_weights(folder)
    state = load_state(folder)
    assert which == "ema" and all(torch.equal(weights[k], v) for k, v in state["ema"]["shadow"].items())
    # the export stays available and adds one copy of the model's weights and one of the EMA's
    exported = toy.fit(toy.toy_config(tmp_path / "b", **{"run.max_steps": 4, "checkpoint.safetensors": True}))
    folder_b = exported.checkpoints.latest()
    assert {"model.safetensors", "ema.safetensors"} <= set(os.listdir(folder_b))
    weights_b, _ = load_weights(folder_b)
    assert all(torch.equal(weights_b[k], v) for k, v in weights.items())
