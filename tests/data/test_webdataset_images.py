"""Tar shards in the webdataset layout (fastdit.data.webdataset_images), alone and through
StreamingDataset: patterns, decoding, hostile archives, exact resume with workers."""
import io
import itertools
import os
import struct
import tarfile
import zlib

import pytest
import torch
from PIL import Image

from fastdit.data.streaming import Skip, StreamingDataset
from fastdit.data.webdataset_images import WebDatasetImages, expand_shard_patterns

SIZE = 16


def jpeg(value: int, size=(24, 20)) -> bytes:
    """A small JPEG: left half coloured by ``value``, right half black (so flips are visible)."""
    img = Image.new("RGB", size, (0, 0, 0))
    img.paste((value % 256, 255 - value % 256, 128), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png_bomb_header() -> bytes:
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def tar_bytes(members, mode="w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(key: str, value: int, label=None, caption=True):
    members = [(f"{key}.jpg", jpeg(value))]
    if caption:
        members.append((f"{key}.txt", f"caption {key}".encode()))
    members.append((f"{key}.json", b'{"width": 24}'))
    if label is not None:
        members.append((f"{key}.cls", str(label).encode()))
    return members


def write_shards(folder, counts, prefix="shard"):
    """Shards ``{prefix}-{i:03d}.tar`` with ``counts[i]`` samples keyed ``{i:03d}{j:04d}``, label ``j % 5``."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, count in enumerate(counts):
        members = []
        for j in range(count):
            members += sample_members(f"{i:03d}{j:04d}", i * 31 + j, label=j % 5)
        path = os.path.join(folder, f"{prefix}-{i:03d}.tar")
        with open(path, "wb") as handle:
            handle.write(tar_bytes(members))
        paths.append(path)
    return paths


def take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def test_samples_batches_and_labels(tmp_path):
    write_shards(tmp_path, [4, 3])
    source = WebDatasetImages(str(tmp_path / "shard-{000..001}.tar"), SIZE, labels=True)
    values = list(source.read(source.items()[0], 0))
    assert len(values) == 4
    assert values[1]["image"].shape == (3, SIZE, SIZE) and values[1]["image"].dtype == torch.uint8
    assert values[1]["caption"] == "caption 0000001" and values[1]["y"] == 1
    assert [v["y"] for v in source.read(source.items()[0], 2)] == [2, 3]  # read from an offset
    batch = take(StreamingDataset(source, 3, seed=0), 1)[0]
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and batch["y"].dtype == torch.int64
    assert len(batch["caption"]) == 3 and all(c.startswith("caption ") for c in batch["caption"])
    no_captions = WebDatasetImages(str(tmp_path / "*.tar"), SIZE, captions=False)
    assert set(next(no_captions.read(no_captions.items()[0], 0))) == {"image"}


def test_flips_are_seeded_and_vary(tmp_path):
    write_shards(tmp_path, [40])
    source = WebDatasetImages(str(tmp_path / "shard-000.tar"), SIZE, seed=1)
    item = source.items()[0]
    # The coloured half is on the left unless flipped.
    flips = [bool(v["image"][:, :, -1].float().mean() > v["image"][:, :, 0].float().mean())
             for v in source.read(item, 0)]
    assert 5 < sum(flips) < 35
    again = [v["image"] for v in source.read_positions(item, 0, 1, 0)]
    assert all(torch.equal(a, v["image"]) for a, v in zip(again, source.read(item, 0)))
    epoch1 = [bool(v["image"][:, :, -1].float().mean() > v["image"][:, :, 0].float().mean())
              for v in source.read_positions(item, 0, 1, 1)]
    assert epoch1 != flips
    unflipped = WebDatasetImages(str(tmp_path / "shard-000.tar"), SIZE, flip=False)
    assert all(v["image"][:, :, 0].float().mean() > v["image"][:, :, -1].float().mean()
               for v in unflipped.read(item, 0))


def test_patterns(tmp_path):
    paths = write_shards(tmp_path / "a", [1, 1, 1])
    joined = f"{paths[0]},{tmp_path}/a/shard-{{001,002}}.tar"
    assert expand_shard_patterns(joined) == paths
    assert expand_shard_patterns(str(tmp_path / "a" / "*.tar")) == paths
    assert expand_shard_patterns(str(tmp_path / "a")) == paths
    assert expand_shard_patterns([paths[2], paths[0], paths[2]]) == [paths[2], paths[0]]
    assert expand_shard_patterns(f"file://{paths[1]}::{paths[0]}") == [paths[1], paths[0]]
    assert expand_shard_patterns("pipe:cat x.tar") == ["pipe:cat x.tar"]
    for pattern in [str(tmp_path / "a" / "*.tgz"), str(tmp_path / "nothing.tar"),
                    str(tmp_path / "a" / "shard-{000..004}.tar"), str(tmp_path / "empty")]:
        if pattern.endswith("empty"):
            os.makedirs(pattern)
        with pytest.raises(ValueError, match="matches no shard") as err:
            WebDatasetImages(pattern, SIZE)
        assert pattern in str(err.value)


def test_pipe_and_gzip_shards(tmp_path):
    path = tmp_path / "z.tar.gz"
    path.write_bytes(tar_bytes(sample_members("k0", 1) + sample_members("k1", 2), mode="w:gz"))
    for url in [str(path), f"pipe:cat {path}"]:
        source = WebDatasetImages(url, SIZE)
        assert [v["caption"] for v in source.read(source.items()[0], 0)] == ["caption k0", "caption k1"]


def hostile_shard(path):
    """A shard with every kind of bad sample; returns the expected value kinds per position."""
    good_a = sample_members("a", 1)
    members = (good_a
               + [("../evil.jpg", jpeg(2)), ("../evil.txt", b"x")]          # path traversal
               + [("/abs.jpg", jpeg(3))]                                      # absolute name
               + sample_members("b", 4)
               + sample_members("c", 5) + [("c.jpg", jpeg(6))]               # same member twice
               + sample_members("b", 7)                                       # key seen before
               + [("d.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("d.txt", b"d")]
               + [("e.txt", b"caption without image")]
               + [("bomb.png", png_bomb_header())]
               + sample_members("f", 8)
               + sample_members("g", 9))
    data = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmember("g.jpg").offset_data + 100  # the shard ends inside g's image
    path.write_bytes(data[:cut])
    return ["a", "unsafe member name", "unsafe member name", "b", "duplicate key", "duplicate key",
            "not an image", "no image", "too large", "f", "truncated shard"]


def describe(values):
    return [v.reason if isinstance(v, Skip) else v["caption"][-1] for v in values]


def test_hostile_shard_is_skipped_and_counted(tmp_path):
    path = tmp_path / "hostile.tar"
    expected = hostile_shard(path)
    source = WebDatasetImages(str(path), SIZE)
    got = describe(source.read(str(path), 0))
    assert got[6] in ("not an image", "corrupt image", "truncated")
    expected[6] = got[6]
    assert got == expected
    assert describe(source.read(str(path), 9)) == ["f", "truncated shard"]
    assert describe(source.read_positions(str(path), 1, 4)) == [expected[1], expected[5], expected[9]]
    assert not os.path.exists(tmp_path / "evil.jpg") and sorted(os.listdir(tmp_path)) == ["hostile.tar"]

    dataset = StreamingDataset(source, 3, seed=0)
    first = take(dataset, 1)[0]
    assert first["caption"] == ["caption a", "caption b", "caption f"]
    skips_per_pass = {}
    for reason in expected:
        if reason not in ("a", "b", "f", "truncated shard"):
            skips_per_pass[reason] = skips_per_pass.get(reason, 0) + 1
    assert dataset.skip_counts() == skips_per_pass
    take(dataset, 1)  # the next epoch: the truncated tail, then the same skips again
    doubled = {k: 2 * v for k, v in skips_per_pass.items()}
    doubled["truncated shard"] = 1
    assert dataset.skip_counts() == doubled


def test_unreadable_and_non_tar_items(tmp_path):
    write_shards(tmp_path, [2])
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    source = WebDatasetImages(f"{tmp_path}/shard-000.tar,{tmp_path}/junk.tar", SIZE)
    os.remove(tmp_path / "shard-000.tar")
    assert list(source.read(source.items()[0], 0)) == [Skip("unreadable item")]
    assert list(source.read(source.items()[0], 1)) == []
    assert list(source.read(source.items()[1], 0)) == [Skip("unreadable item")]
    with pytest.raises(RuntimeError, match="no usable sample"):
        take(StreamingDataset(source, 2, seed=0), 1)


def test_missing_label_is_a_skip(tmp_path):
    path = tmp_path / "l.tar"
    path.write_bytes(tar_bytes(sample_members("a", 1, label=3) + sample_members("b", 2)
                               + sample_members("c", 2, label="x")))
    source = WebDatasetImages(str(path), SIZE, labels=True)
    values = list(source.read(str(path), 0))
    assert values[0]["y"] == 3 and values[1:] == [Skip("no label"), Skip("no label")]


def test_two_ranks_two_workers_cover_epoch_and_resume(tmp_path):
    """2 ranks x 2 workers over 5 unequal shards (one much larger): disjoint and complete over the
    first epoch's samples, and an interrupted run resumes (mid-rotation) with identical images."""
    write_shards(tmp_path, [3, 2, 30, 1, 4])
    source = WebDatasetImages(str(tmp_path / "*.tar"), SIZE, seed=7)
    all_captions = {f"caption {i:03d}{j:04d}" for i, n in enumerate([3, 2, 30, 1, 4]) for j in range(n)}
    seen = []
    for rank in range(2):
        # Batch size 1, so the state after each batch tells the epoch of its one sample; the rotation tells
        # which worker slot made it.
        dataset = StreamingDataset(source, 1, seed=3, rank=rank, world_size=2, num_workers=2,
                                   multiprocessing_context="fork")
        epoch0, iterator = [], iter(dataset)
        for index in range(200):
            batch = next(iterator)
            slots = dataset.state_dict()["slots"]
            if slots[index % 2]["epoch"] == 0:
                epoch0.append(batch["caption"][0])
            if min(s["epoch"] for s in slots) >= 1:
                break
        seen.append(epoch0)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_captions)

    make = lambda: StreamingDataset(source, 2, seed=3, rank=1, world_size=2, num_workers=2,  # noqa: E731
                                    multiprocessing_context="fork")
    reference = take(make(), 9)
    first = make()
    take(first, 5)
    state = first.state_dict()
    assert state["next_slot"] == 1
    torch.save(state, tmp_path / "s.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for got, want in zip(take(resumed, 4), reference[5:]):
        assert got["caption"] == want["caption"] and torch.equal(got["image"], want["image"])


def test_single_shard_many_slots_by_sample(tmp_path):
    write_shards(tmp_path, [9])
    source = WebDatasetImages(str(tmp_path / "*.tar"), SIZE)
    captions = []
    for rank in range(3):
        dataset = StreamingDataset(source, 3, seed=0, rank=rank, world_size=3, shuffle=False)
        captions.append(take(dataset, 1)[0]["caption"])
    assert sorted(c for cs in captions for c in cs) == sorted(f"caption 000{j:04d}" for j in range(9))
