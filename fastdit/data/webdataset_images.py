"""Images from tar shards in the webdataset / img2dataset layout, as a streaming :class:`SampleSource`.

A shard holds samples as consecutive members that share a key: ``{key}.jpg|jpeg|png|webp`` (the image),
``{key}.txt`` (caption), ``{key}.json`` (metadata, not used in batches), ``{key}.cls`` (integer label).
Shards are read as streams with the ``webdataset`` library (local files, ``pipe:`` commands and the URL
schemes it opens; other ``proto://`` URLs through fsspec) and nothing is ever written to disk.

Shards come from untrusted places, so every problem becomes a counted :class:`Skip` at its position,
never a crash: unsafe member names (``../x.jpg``, ``/abs.jpg``), keys that repeat, images that do not
decode (with the :class:`~fastdit.data.images.ImageRejected` reason), samples without an image, and a
shard that ends in the middle (``"truncated shard"`` after the samples before it).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Union

import braceexpand
from webdataset.gopen import gopen, gopen_schemes
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from fastdit.data.images import ImageRejected, seeded_flip, training_image
from fastdit.data.streaming import Sample, SampleSource, Skip

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
_USED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("txt", "cls", "json"))
_GLOB_CHARS = re.compile(r"[*?\[]")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

SKIP_UNSAFE_NAME = "unsafe member name"
SKIP_DUPLICATE_KEY = "duplicate key"
SKIP_NO_IMAGE = "no image"
SKIP_NO_LABEL = "no label"
SKIP_TRUNCATED = "truncated shard"
SKIP_UNREADABLE = "unreadable item"


def is_safe_member_name(name: str) -> bool:
    """A relative, plain path: no leading ``/``, no ``..`` component, no backslash, drive or control
    character. (Nothing is extracted, but such names are the signature of a hostile or broken shard.)"""
    if not name or name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return ".." not in name.split("/")


def _split_top_level_commas(spec: str) -> List[str]:
    """``"a.tar,b-{0,1}.tar"`` -> ``["a.tar", "b-{0,1}.tar"]``: commas inside braces belong to the brace
    list, commas outside separate patterns."""
    parts, depth, current = [], 0, []
    for char in spec:
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def expand_shard_patterns(urls: Union[str, Sequence[str]]) -> List[str]:
    """Shard ids from patterns: comma- or ``::``-separated lists, brace lists (``shard-{000..099}.tar``),
    local globs (``data/*.tar``, sorted), directories (their ``*.tar`` files, sorted), ``pipe:`` commands
    and ``proto://`` URLs (globbed through fsspec when they contain ``*?[``). Duplicates are dropped
    (first one kept). A local pattern that matches nothing is a ``ValueError`` naming it."""
    patterns: List[str] = []
    for spec in ([urls] if isinstance(urls, str) else list(urls)):
        if not isinstance(spec, str):
            raise TypeError(f"shard patterns must be strings, got {type(spec).__name__}")
        if spec.startswith("pipe:"):
            patterns.append(spec)  # a shell command: commas and braces are the command's business
            continue
        for part in spec.split("::"):
            patterns.extend(_split_top_level_commas(part))
    if not patterns:
        raise ValueError(f"no shard patterns given (got {urls!r})")
    shards: List[str] = []
    for pattern in patterns:
        if pattern.startswith("pipe:"):
            shards.append(pattern)
            continue
        for expanded in braceexpand.braceexpand(pattern):
            shards.extend(_expand_one(expanded, pattern))
    return list(dict.fromkeys(shards))


def _expand_one(path: str, pattern: str) -> List[str]:
    if _SCHEME.match(path) and not path.startswith("file://"):
        if not _GLOB_CHARS.search(path):
            return [path]  # remote: opened (and checked) when read
        try:
            import fsspec
            fs, _, found = fsspec.get_fs_token_paths(path)
        except Exception as err:  # noqa: BLE001 - unknown protocol, missing backend, no network ...
            raise ValueError(f"shard pattern {pattern!r}: cannot list {path!r} ({type(err).__name__}: {err})") \
                from None
        if not found:
            raise ValueError(f"shard pattern {pattern!r} matches no shard")
        protocol = path.split("://", 1)[0]
        return sorted(p if _SCHEME.match(p) else f"{protocol}://{p}" for p in found)
    local = path[len("file://"):] if path.startswith("file://") else path
    local = os.path.expanduser(local)
    if _GLOB_CHARS.search(local):
        found = sorted(p for p in glob.glob(local) if os.path.isfile(p))
    elif os.path.isdir(local):
        found = sorted(p for p in glob.glob(os.path.join(glob.escape(local), "*.tar")) if os.path.isfile(p))
    else:
        found = [local] if os.path.isfile(local) else []
    if not found:
        raise ValueError(f"shard pattern {pattern!r} matches no shard"
                         + (f" ({path!r} does not exist)" if path != pattern or not _GLOB_CHARS.search(path)
                            else ""))
    return found


def open_shard(url: str):
    """A readable binary stream for a shard id: local files directly, ``pipe:`` and the schemes
    webdataset's ``gopen`` knows (http(s) through curl, ...), other ``proto://`` URLs through fsspec."""
    scheme = url.split("://", 1)[0] if _SCHEME.match(url) else ""
    if scheme and scheme not in gopen_schemes and scheme != "file":
        import fsspec
        return fsspec.open(url, "rb").open()
    return gopen(url[len("file://"):] if scheme == "file" else url, "rb")


class WebDatasetImages(SampleSource):
    """Samples ``{"image": uint8 (3, size, size), "caption": str, "y": int}`` from webdataset tar shards.

    Args:
        urls: shard patterns (see :func:`expand_shard_patterns`); a str or a list of str.
        size: side S of the square training image (short side resized to S, centre crop).
        seed: seeds the horizontal flips (a hash of seed, shard, position and epoch).
        captions: put ``"caption"`` (``{key}.txt``, UTF-8, stripped; ``""`` when missing) in samples.
        labels: put ``"y"`` (``{key}.cls``, an integer) in samples; a sample without one is
            ``Skip("no label")``.
        flip: random horizontal flips (probability 0.5).
        max_pixels, min_side: passed to :func:`~fastdit.data.images.decode_image`.

    Items are the shard ids; positions are the samples (key groups) of a shard in order.
    """

    name = "webdataset"

    def __init__(self, urls: Union[str, Sequence[str]], size: int, *, seed: int = 0, captions: bool = True,
                 labels: bool = False, flip: bool = True, max_pixels: int = 64_000_000, min_side: int = 1):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.urls = urls
        self.shards = expand_shard_patterns(urls)
        self.size, self.seed, self.captions, self.labels, self.flip = size, seed, captions, labels, flip
        self.max_pixels, self.min_side = max_pixels, min_side

    def items(self) -> List[str]:
        return list(self.shards)

    def read(self, item: str, start: int) -> Iterator[Union[Sample, Skip]]:
        return self.read_positions(item, start, 1, 0)

    def read_positions(self, item: str, start: int, stride: int = 1,
                       epoch: int = 0) -> Iterator[Union[Sample, Skip]]:
        """Values at positions ``start, start + stride, ...`` of shard ``item``; the shard is streamed
        from its beginning (tar has no index) but only the kept positions are decoded."""
        if start < 0 or stride < 1:
            raise ValueError(f"bad start={start} / stride={stride}")
        position = 0
        for group in self._groups(item):
            if position >= start and (position - start) % stride == 0:
                yield group if isinstance(group, Skip) else self._sample(item, position, epoch, group)
            position += 1

    # ---- one shard as a stream of key groups ----------------------------------------------------------
    def _groups(self, item: str) -> Iterator[Union[Skip, Dict[str, bytes]]]:
        """Every position of the shard: a Skip, or ``{"__key__": key, ext: bytes, ...}`` to decode."""
        try:
            stream = open_shard(item)
        except Exception:  # noqa: BLE001 - missing file, bad URL, failed command ...
            yield Skip(SKIP_UNREADABLE)
            return
        seen_keys = set()
        current: Optional[Dict[str, bytes]] = None
        problem: Optional[str] = None  # why the current group is a Skip, if it is one
        members_read = 0
        announced: List[str] = []  # the member tar_file_iterator is about to read (via select_files)

        def wanted(fname: str) -> bool:
            announced[:] = [fname]
            return self._wanted(fname)

        try:
            members = tar_file_iterator(stream, handler=reraise_exception, select_files=wanted)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    break
                except Exception:  # noqa: BLE001 - tarfile.ReadError, EOFError, zlib.error (.tar.gz), ...
                    # The bytes ran out (or turned to garbage) inside the archive. The group being built is
                    # complete only if the member that failed already had another key; otherwise it may
                    # lack members, so it is dropped. The samples before it stand.
                    if current is not None and announced and base_plus_ext(announced[0])[0] not in (
                            None, current["__key__"]):
                        yield Skip(problem) if problem else current
                    yield Skip(SKIP_TRUNCATED if members_read else SKIP_UNREADABLE)
                    return
                members_read += 1
                fname = member["fname"]
                key, ext = base_plus_ext(fname)
                if key is None:
                    continue  # no extension: not part of any sample (webdataset ignores these too)
                ext = ext.lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield Skip(problem) if problem else current
                    current, problem = {"__key__": key}, None
                    if key in seen_keys:
                        problem = SKIP_DUPLICATE_KEY
                    seen_keys.add(key)
                if not is_safe_member_name(fname):
                    problem = problem or SKIP_UNSAFE_NAME
                elif ext in current:
                    problem = problem or SKIP_DUPLICATE_KEY
                current[ext] = member["data"]
            if current is not None:
                yield Skip(problem) if problem else current
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - e.g. a pipe: command that exited non-zero
                    pass

    @staticmethod
    def _wanted(fname: str) -> bool:
        """Only members a sample can use are read into memory; the rest are skipped in the stream
        (a shard may carry big extras such as ``.mp4`` or ``.npy``). Unsafe names are kept so that they
        can be reported."""
        _, ext = base_plus_ext(fname)
        if ext is None:
            return False  # belongs to no sample
        return ext.lower() in _USED_EXTENSIONS or not is_safe_member_name(fname)

    def _sample(self, item: str, position: int, epoch: int, group: Dict[str, bytes]) -> Union[Sample, Skip]:
        image_bytes = next((group[ext] for ext in IMAGE_EXTENSIONS if ext in group), None)
        if image_bytes is None:
            return Skip(SKIP_NO_IMAGE)
        sample: Sample = {}
        if self.labels:
            try:
                sample["y"] = int(group["cls"].decode("utf-8").strip())
            except (KeyError, UnicodeDecodeError, ValueError):
                return Skip(SKIP_NO_LABEL)
        flip = self.flip and seeded_flip(self.seed, item, position, epoch)
        try:
            sample["image"] = training_image(image_bytes, self.size, flip=flip, max_pixels=self.max_pixels,
                                             min_side=self.min_side)
        except ImageRejected as err:
            return Skip(err.reason)
        if self.captions:
            sample["caption"] = group.get("txt", b"").decode("utf-8", errors="replace").strip()
        return sample

    def __repr__(self) -> str:
        return (f"WebDatasetImages({len(self.shards)} shards, first={self.shards[0]!r}, size={self.size}, "
                f"captions={self.captions}, labels={self.labels})")
