"""A plain image folder as a streaming source (fastdit.data.folder)."""
import itertools

import pytest
import torch
from PIL import Image

from fastdit.data.folder import ImageFolder
from fastdit.data.streaming import Skip, StreamingDataset

SIZE = 16


def save(path, value, fmt="JPEG", size=(20, 18)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 0)).save(path, fmt)


def take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def test_class_folders_give_sorted_labels(tmp_path):
    for name, count in [("dog", 3), ("cat", 2), ("zebra", 1)]:
        for i in range(count):
            save(tmp_path / name / f"{i}.jpg", 10 * i)
    save(tmp_path / "cat" / "nested" / "deep.png", 5, fmt="PNG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.jpg").write_bytes(b"x")
    source = ImageFolder(str(tmp_path), SIZE, chunk_size=2)
    assert source.class_names == ["cat", "dog", "zebra"]
    assert len(source.files) == 7 and len(source.items()) == 4
    labels = [v["y"] for item in source.items() for v in source.read(item, 0)]
    assert labels == [0, 0, 0, 1, 1, 1, 2]
    batch = take(StreamingDataset(source, 4, seed=0), 1)[0]
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
    assert batch["y"].dtype == torch.int64 and set(batch) == {"image", "y"}


def test_flat_folder_is_unlabelled_and_bad_files_are_skipped(tmp_path):
    for i in range(5):
        save(tmp_path / f"{i}.png", 40 * i, fmt="PNG")
    (tmp_path / "5.jpg").write_bytes(b"\xff\xd8 broken")
    source = ImageFolder(str(tmp_path), SIZE, chunk_size=4)
    assert source.class_names is None
    values = [v for item in source.items() for v in source.read(item, 0)]
    assert [set(v) if isinstance(v, dict) else v for v in values[:5]] == [{"image"}] * 5
    assert isinstance(values[5], Skip) and values[5].reason in ("not an image", "corrupt image", "truncated")
    assert [v for v in source.read(source.items()[1], 1)] == [values[5]]  # offsets within a chunk
    dataset = StreamingDataset(source, 5, seed=0, shuffle=False)
    take(dataset, 2)
    assert dataset.skip_counts() == {values[5].reason: 1}


def test_split_over_ranks_and_workers(tmp_path):
    for i in range(12):
        save(tmp_path / "a" / f"{i:02d}.jpg", i)
    source = ImageFolder(str(tmp_path), SIZE, chunk_size=3)  # 4 chunks for 2 ranks x 2 workers
    for rank in range(2):
        dataset = StreamingDataset(source, 2, seed=1, rank=rank, world_size=2, num_workers=2,
                                   multiprocessing_context="fork")
        assert len(take(dataset, 5)) == 5


def test_resume_gives_identical_images(tmp_path):
    for i in range(10):
        save(tmp_path / f"{i}.jpg", 20 * i, size=(30, 20))
    make = lambda: StreamingDataset(ImageFolder(str(tmp_path), SIZE, seed=2, chunk_size=3), 3, seed=5)  # noqa: E731
    reference = take(make(), 6)
    first = make()
    take(first, 2)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(take(resumed, 4), reference[2:]))


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="no image files") as err:
        ImageFolder(str(tmp_path), SIZE)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolder(str(tmp_path / "missing"), SIZE)
    save(tmp_path / "top.jpg", 1)
    save(tmp_path / "cls" / "x.jpg", 1)
    with pytest.raises(ValueError, match="both images"):
        ImageFolder(str(tmp_path), SIZE)
