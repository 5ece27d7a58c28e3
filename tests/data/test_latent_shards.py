"""Latent shards on disk: the writer's whole-shard crash safety and manifest, validation errors that name the
file and the problem, and the reader as a streaming source (flip views, strided reads, ranks)."""
import json
import os

import pytest
import torch

from fastdit.data.latent_shards import (LatentShards, LatentShardWriter, read_manifest, shard_file_name)
from fastdit.data.streaming import Skip, StreamingDataset

SHAPE = (4, 8, 8)
META = {"latent_space": {"class": "test", "scaling_factor": 0.5}, "image_size": 64, "class_names": None}


def make_data(n, *, flip=False, captions=False, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = {"x": torch.randn(n, *SHAPE, generator=gen).to(dtype), "y": torch.arange(n, dtype=torch.int64)}
    if flip:
        data["x_flip"] = torch.randn(n, *SHAPE, generator=gen).to(dtype)
    if captions:
        data["context"] = torch.randn(n, 5, 6, generator=gen).to(dtype)
        data["context_mask"] = torch.arange(5)[None, :] < torch.randint(0, 6, (n, 1), generator=gen)
    return data


def write(directory, data, shard_size, *, finish=True, meta=META, step=7):
    """Add ``data`` in pieces of ``step`` samples (so shards straddle add() calls)."""
    writer = LatentShardWriter(str(directory), shard_size, meta)
    n = data["x"].shape[0]
    for begin in range(0, n, step):
        end = min(n, begin + step)
        writer.add({k: v[begin:end] for k, v in data.items()}, [{"sample": i + 1} for i in range(begin, end)])
    if finish:
        writer.finish({"sample": n})
    return writer


def read_all(source, **kw):
    out = []
    for item in source.items():
        out += list(source.read(item, 0, **kw))
    return out


def test_round_trip_shapes_dtypes_values_and_manifest(tmp_path):
    data = make_data(21, captions=True)
    write(tmp_path, data, shard_size=8)
    names = sorted(os.listdir(tmp_path))
    assert names == ["latents-000000.safetensors", "latents-000001.safetensors", "latents-000002.safetensors",
                     "manifest.json"]
    m = read_manifest(str(tmp_path), verify_checksums=True)
    assert m["format"] == "fastdit-latent-shards" and m["format_version"] == 1 and m["complete"] is True
    assert m["num_samples"] == 21 and [s["num_samples"] for s in m["shards"]] == [8, 8, 5]
    assert m["tensors"] == {"x": {"shape": [4, 8, 8], "dtype": "bfloat16"}, "y": {"shape": [], "dtype": "int64"},
                            "context": {"shape": [5, 6], "dtype": "bfloat16"},
                            "context_mask": {"shape": [5], "dtype": "bool"}}
    assert m["latent_space"] == META["latent_space"] and m["image_size"] == 64 and "created" in m
    assert [s["completed_inputs"] for s in m["shards"]] == [{"sample": 8}, {"sample": 16}, {"sample": 21}]
    assert (m["shards"][1]["y_min"], m["shards"][1]["y_max"]) == (8, 15)

    source = LatentShards(str(tmp_path), dtype=None)
    assert source.name == "latents" and source.num_samples == 21 and source.latent_shape == SHAPE
    assert source.items() == [str(tmp_path / shard_file_name(i)) for i in range(3)]
    samples = read_all(source)
    assert len(samples) == 21 and set(samples[0]) == {"x", "y", "context", "context_mask"}
    x = torch.stack([s["x"] for s in samples])
    assert x.dtype == torch.bfloat16 and torch.equal(x, data["x"])
    assert torch.equal(torch.stack([s["y"] for s in samples]), data["y"])
    assert torch.equal(torch.stack([s["context"] for s in samples]), data["context"])
    mask = torch.stack([s["context_mask"] for s in samples])
    assert mask.dtype == torch.bool and torch.equal(mask, data["context_mask"])
    # default: float32 out, the same values
    as_float = torch.stack([s["x"] for s in read_all(LatentShards(str(tmp_path)))])
    assert as_float.dtype == torch.float32 and torch.equal(as_float, data["x"].float())
    assert LatentShards(str(tmp_path)).label_range == (0, 20)


def test_read_from_an_offset_and_in_small_chunks_is_the_same(tmp_path):
    data = make_data(20)
    write(tmp_path, data, shard_size=20)
    big, small = LatentShards(str(tmp_path)), LatentShards(str(tmp_path), chunk_bytes=1)
    item = big.items()[0]
    whole = list(big.read(item, 0))
    for start in (0, 7, 19, 20):
        part = list(small.read(item, start))
        assert len(part) == 20 - start
        assert all(torch.equal(a["x"], b["x"]) for a, b in zip(part, whole[start:]))
    for stride, start in ((3, 1), (2, 0), (7, 6)):
        strided = list(small.read_positions(item, start, stride))
        assert [int(s["y"]) for s in strided] == list(range(start, 20, stride))


def test_flip_views_are_chosen_half_the_time_deterministically_per_position(tmp_path):
    data = make_data(400, flip=True)
    write(tmp_path, data, shard_size=200, step=50)
    source = LatentShards(str(tmp_path), seed=3)
    assert source.has_flip_views and source.flip
    samples = read_all(source)
    flipped = torch.tensor([torch.equal(s["x"], data["x_flip"][i].float()) for i, s in enumerate(samples)])
    plain = torch.tensor([torch.equal(s["x"], data["x"][i].float()) for i, s in enumerate(samples)])
    assert bool((flipped ^ plain).all())  # always exactly one of the two views
    assert 140 < int(flipped.sum()) < 260
    item = source.items()[1]
    again = list(LatentShards(str(tmp_path), seed=3).read(item, 150))  # from an offset: the same choices
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(again, samples[350:]))
    other_seed = read_all(LatentShards(str(tmp_path), seed=4))
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(other_seed, samples))
    epoch1 = list(source.read_positions(source.items()[0], 0, 1, epoch=1))
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(epoch1, samples[:200]))
    no_flip = read_all(LatentShards(str(tmp_path), flip=False))
    assert all(torch.equal(s["x"], data["x"][i].float()) for i, s in enumerate(no_flip))
    assert "x_flip" not in samples[0]


def test_two_ranks_read_disjoint_samples_that_cover_the_data(tmp_path):
    write(tmp_path, make_data(64), shard_size=16)
    for world, batch in ((2, 8), (4, 4)):
        seen = []
        for rank in range(world):
            ds = StreamingDataset(LatentShards(str(tmp_path)), batch, seed=5, rank=rank, world_size=world)
            it = iter(ds)
            ys = torch.cat([next(it)["y"] for _ in range(64 // world // batch)])
            seen.append(set(ys.tolist()))
            assert len(seen[-1]) == 64 // world
        assert set().union(*seen) == set(range(64))
    # fewer shards than ranks: split by sample, still disjoint
    one = tmp_path / "one"
    write(one, make_data(30), shard_size=64)
    parts = []
    for rank in range(3):
        it = iter(StreamingDataset(LatentShards(str(one)), 5, seed=0, rank=rank, world_size=3))
        parts.append(set(torch.cat([next(it)["y"] for _ in range(2)]).tolist()))
    assert sum(len(p) for p in parts) == 30 and set().union(*parts) == set(range(30))


def test_streaming_state_resumes_with_the_next_batch(tmp_path):
    write(tmp_path, make_data(50, flip=True), shard_size=16)
    ds = StreamingDataset(LatentShards(str(tmp_path), seed=1), 6, seed=2)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = ds.state_dict()
    expected = [next(it) for _ in range(6)]
    fresh = StreamingDataset(LatentShards(str(tmp_path), seed=1), 6, seed=2)
    fresh.load_state_dict(state)
    got = iter(fresh)
    for want in expected:
        batch = next(got)
        assert torch.equal(batch["x"], want["x"]) and torch.equal(batch["y"], want["y"])


def test_a_killed_writer_leaves_whole_shards_and_continues(tmp_path):
    data = make_data(30)
    writer = write(tmp_path, {k: v[:19] for k, v in data.items()}, shard_size=8, finish=False)
    assert writer.num_samples == 16 and writer.buffered == 3 and writer.completed_inputs == {"sample": 16}
    # the process dies here: the 3 buffered samples are lost, the 2 shards are whole and listed
    m = read_manifest(str(tmp_path), verify_checksums=True)
    assert m["complete"] is False and m["num_samples"] == 16
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    with pytest.raises(ValueError, match="incomplete.*interrupted"):
        LatentShards(str(tmp_path))
    assert LatentShards(str(tmp_path), require_complete=False).num_samples == 16
    (tmp_path / (shard_file_name(2) + ".tmp-99")).write_bytes(b"half a shard")  # a torn temporary file
    again = LatentShardWriter(str(tmp_path), 8, META)
    assert again.num_shards == 2 and again.completed_inputs == {"sample": 16}
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    again.add({k: v[16:] for k, v in data.items()}, [{"sample": i + 1} for i in range(16, 30)])
    again.finish({"sample": 30})
    whole = tmp_path / "whole"
    write(whole, data, shard_size=8)
    for i in range(4):
        assert (tmp_path / shard_file_name(i)).read_bytes() == (whole / shard_file_name(i)).read_bytes()
    assert LatentShardWriter(str(tmp_path), 8, META).complete


def test_continuing_with_other_settings_is_refused(tmp_path):
    write(tmp_path, make_data(10), shard_size=8, finish=False)
    with pytest.raises(ValueError, match=r"other settings.*image_size: recorded 64, now 128"):
        LatentShardWriter(str(tmp_path), 8, {**META, "image_size": 128})
    with pytest.raises(ValueError, match="shard_size: recorded 8, now 4"):
        LatentShardWriter(str(tmp_path), 4, META)
    writer = LatentShardWriter(str(tmp_path), 8, META)
    with pytest.raises(ValueError, match="same keys, shapes and dtypes"):
        writer.add(make_data(2, dtype=torch.float32), [{}, {}])
    with pytest.raises(ValueError, match="reserved"):
        LatentShardWriter(str(tmp_path / "new"), 8, {"shards": 1})


def _corrupt(tmp_path, name):
    """A finished 3-shard directory to break."""
    directory = tmp_path / name
    write(directory, make_data(20), shard_size=8)
    return directory


def test_missing_or_bad_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such latent shard directory"):
        read_manifest(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"manifest.json: missing manifest"):
        LatentShards(str(tmp_path))
    d = _corrupt(tmp_path, "json")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json: unreadable manifest"):
        read_manifest(str(d))
    d = _corrupt(tmp_path, "format")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a latent shard manifest"):
        read_manifest(str(d))
    (d / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        read_manifest(str(d))
    (d / "manifest.json").write_text(json.dumps({**m, "num_samples": 21}))
    with pytest.raises(ValueError, match="num_samples is 21 but the shards hold 20"):
        read_manifest(str(d))
    bad_shape = {**m, "tensors": {**m["tensors"], "x": {"shape": [4, 8, 4], "dtype": "bfloat16"}}}
    (d / "manifest.json").write_text(json.dumps(bad_shape))
    with pytest.raises(ValueError, match=r"latents-000000.safetensors: tensor 'x' has shape \[8, 4, 8, 8\], "
                                         r"the manifest says \[8, 4, 8, 4\]"):
        read_manifest(str(d))


def test_missing_truncated_and_corrupt_shards_are_named(tmp_path):
    d = _corrupt(tmp_path, "missing")
    os.remove(d / shard_file_name(1))
    with pytest.raises(ValueError, match=r"latents-000001.safetensors: missing shard"):
        LatentShards(str(d))
    d = _corrupt(tmp_path, "truncated")
    path = d / shard_file_name(2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"latents-000002.safetensors: \d+ bytes, the manifest records \d+"):
        read_manifest(str(d))
    d = _corrupt(tmp_path, "flipped")
    path = d / shard_file_name(0)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the data: same size, valid header
    path.write_bytes(bytes(raw))
    read_manifest(str(d))  # a header check cannot see it ...
    with pytest.raises(ValueError, match=r"latents-000000.safetensors: sha256 \w+ does not match"):
        LatentShards(str(d), verify_checksums=True)  # ... the checksum does
    d = _corrupt(tmp_path, "garbage")
    path = d / shard_file_name(1)
    path.write_bytes(b"\xff" * len(path.read_bytes()))
    with pytest.raises(ValueError, match=r"latents-000001.safetensors: unreadable shard"):
        read_manifest(str(d))


def test_a_shard_that_breaks_after_validation_is_skipped_not_fatal(tmp_path):
    d = _corrupt(tmp_path, "late")
    source = LatentShards(str(d))
    os.remove(source.items()[1])
    assert list(source.read(source.items()[1], 0)) == [Skip("unreadable item")]
    ds = StreamingDataset(source, 4, shuffle=False)
    it = iter(ds)
    ys = torch.cat([next(it)["y"] for _ in range(3)])  # 8 + 4 readable samples of the first epoch
    assert ys.tolist() == list(range(8)) + list(range(16, 20))
    assert ds.skip_counts() == {"unreadable item": 1}


def test_dataloader_workers_read_the_shards(tmp_path):
    write(tmp_path, make_data(64, flip=True), shard_size=16)
    ds = StreamingDataset(LatentShards(str(tmp_path), seed=1), 8, seed=0, num_workers=2)
    it = iter(ds)
    batches = [next(it) for _ in range(8)]  # one epoch: each worker reads 2 whole shards
    ys = torch.cat([b["y"] for b in batches])
    assert sorted(ys.tolist()) == list(range(64)) and batches[0]["x"].dtype == torch.float32
    del it
