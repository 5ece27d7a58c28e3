"""A plain folder of images as a streaming :class:`SampleSource` (class sub-folders give labels).

Layouts:

* ``root/<class name>/**/<image>``: labelled; classes are the sorted sub-folder names -> ``0..K-1``
  (:attr:`ImageFolder.class_names`), images anywhere below a class folder;
* ``root/<image>``: unlabelled (no sub-folders at all).

The sorted file list is cut into chunks of ``chunk_size`` files; the chunks are the items that
:class:`~fastdit.data.streaming.StreamingDataset` deals to ranks and workers. Unreadable or undecodable
files become counted skips (the :class:`~fastdit.data.images.ImageRejected` reason, or
``"unreadable file"``).
"""
from __future__ import annotations

import os
import re
from typing import Iterator, List, Optional, Tuple, Union

from fastdit.data.images import ImageRejected, seeded_flip, training_image
from fastdit.data.streaming import Sample, SampleSource, Skip

IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SKIP_UNREADABLE_FILE = "unreadable file"
_ITEM = re.compile(r"^(?P<root>.*)#files=(?P<start>\d+):(?P<stop>\d+)$")


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_FILE_EXTENSIONS)


class ImageFolder(SampleSource):
    """Samples ``{"image": uint8 (3, size, size)}`` plus ``"y": int`` (class index) when the folder has
    class sub-folders.

    Args:
        root: the folder.
        size: side S of the square training image (short side resized to S, centre crop).
        seed: seeds the horizontal flips (a hash of seed, file path and epoch).
        chunk_size: files per item (the unit split over ranks and workers).
        flip: random horizontal flips (probability 0.5).
        max_pixels, min_side: passed to :func:`~fastdit.data.images.decode_image`.

    Items are ``"{root}#files={start}:{stop}"`` ranges of the sorted file list (:attr:`files`, paths
    relative to ``root``); positions are the files of a range in order. Hidden files and files with
    other extensions are not listed.
    """

    name = "folder"

    def __init__(self, root: str, size: int, *, seed: int = 0, chunk_size: int = 256, flip: bool = True,
                 max_pixels: int = 64_000_000, min_side: int = 1):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not os.path.isdir(root):
            raise ValueError(f"ImageFolder: {root!r} is not a directory")
        self.root = os.path.abspath(root)
        self.size, self.seed, self.chunk_size, self.flip = size, seed, chunk_size, flip
        self.max_pixels, self.min_side = max_pixels, min_side
        self.class_names: Optional[List[str]] = None
        # (relative path, label or -1), sorted by path; built once so every process agrees on it.
        self.files: List[Tuple[str, int]] = self._scan()
        if not self.files:
            raise ValueError(f"ImageFolder: no image files ({', '.join(IMAGE_FILE_EXTENSIONS)}) in {root!r}")

    def _scan(self) -> List[Tuple[str, int]]:
        entries = sorted(e for e in os.listdir(self.root) if not e.startswith("."))
        class_dirs = [e for e in entries if os.path.isdir(os.path.join(self.root, e))]
        top_images = [e for e in entries if _is_image_file(e) and os.path.isfile(os.path.join(self.root, e))]
        if not class_dirs:
            return [(name, -1) for name in top_images]
        if top_images:
            raise ValueError(f"ImageFolder: {self.root!r} has both images at its top level (e.g. "
                             f"{top_images[0]!r}) and class sub-folders (e.g. {class_dirs[0]!r}); use one layout")
        self.class_names = class_dirs
        files = []
        for label, class_name in enumerate(class_dirs):
            class_root = os.path.join(self.root, class_name)
            for dirpath, dirnames, filenames in os.walk(class_root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if _is_image_file(filename):
                        files.append((os.path.relpath(os.path.join(dirpath, filename), self.root), label))
        return sorted(files)

    @property
    def labelled(self) -> bool:
        return self.class_names is not None

    def items(self) -> List[str]:
        return [f"{self.root}#files={start}:{min(start + self.chunk_size, len(self.files))}"
                for start in range(0, len(self.files), self.chunk_size)]

    def read(self, item: str, start: int) -> Iterator[Union[Sample, Skip]]:
        return self.read_positions(item, start, 1, 0)

    def read_positions(self, item: str, start: int, stride: int = 1,
                       epoch: int = 0) -> Iterator[Union[Sample, Skip]]:
        """Files ``start, start + stride, ...`` of the chunk ``item``, decoded (only those)."""
        match = _ITEM.match(item)
        if match is None or match["root"] != self.root:
            raise ValueError(f"ImageFolder: {item!r} is not an item of {self.root!r}")
        first, stop = int(match["start"]), min(int(match["stop"]), len(self.files))
        for index in range(first + start, stop, stride):
            yield self._sample(index, epoch)

    def _sample(self, index: int, epoch: int) -> Union[Sample, Skip]:
        relative, label = self.files[index]
        try:
            with open(os.path.join(self.root, relative), "rb") as handle:
                data = handle.read()
        except OSError:
            return Skip(SKIP_UNREADABLE_FILE)
        flip = self.flip and seeded_flip(self.seed, relative, epoch)
        try:
            image = training_image(data, self.size, flip=flip, max_pixels=self.max_pixels,
                                   min_side=self.min_side)
        except ImageRejected as err:
            return Skip(err.reason)
        return {"image": image, "y": label} if label >= 0 else {"image": image}

    def __repr__(self) -> str:
        classes = f"{len(self.class_names)} classes" if self.class_names is not None else "unlabelled"
        return f"ImageFolder({self.root!r}, {len(self.files)} files, {classes}, size={self.size})"
