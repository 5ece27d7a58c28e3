"""Pre-encoded latents on disk: safetensors shards plus a manifest, their writer and a streaming reader.

A latent shard directory holds

    manifest.json                      what is there and how it was made (see below)
    latents-000000.safetensors         shard 0: up to ``shard_size`` samples
    latents-000001.safetensors         ...

Each shard is a safetensors file with, for its N samples,

    x             (N, C, H, W)   latents in the stored dtype (bfloat16, float16 or float32)
    x_flip        (N, C, H, W)   optional: latents of the horizontally flipped image
    y             (N,)  int64    optional: class labels
    context       (N, L, D)      optional: caption embeddings (stored dtype)
    context_mask  (N, L)  bool   optional: True at real caption tokens

``manifest.json`` (a JSON object):

    format, format_version     "fastdit-latent-shards", 1
    created, updated           ISO-8601 UTC times
    complete                   true once the writer finished (every input was read)
    num_samples                the total over the shards
    shard_size                 samples per shard (the last one of a complete directory may hold fewer)
    tensors                    {"x": {"shape": [C, H, W], "dtype": "bfloat16"}, ...}: per-sample shape, dtype
    shards                     [{"file", "num_samples", "bytes", "sha256", "completed_inputs", "y_min"?,
                               "y_max"?}, ...] in order
    completed_inputs           (when complete) the input position after the last input read
    ...meta                    whatever the writer was given: the latent space's identity, the caption
                               encoder's, the image size, flip views, class names, the source (see
                               :mod:`fastdit.data.prepare`)

Writing is crash-safe at shard granularity: every shard is written to a temporary file, fsynced and renamed
into place, and then the manifest is rewritten the same way. A killed run leaves whole shards only, and the
manifest lists exactly the shards that are complete; ``completed_inputs`` of the last listed shard tells a
resuming writer where the input stood after that shard's last sample.

Reading: :func:`read_manifest` validates a directory; :class:`LatentShards` is a
:class:`~fastdit.data.streaming.SampleSource` over the shards (one item per shard), read through
memory-mapped ``safetensors.safe_open`` in chunks, so a data set never has to fit in memory.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import zlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch

from fastdit.data.base import derive_seed
from fastdit.data.streaming import Sample, SampleSource, Skip

FORMAT_NAME = "fastdit-latent-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSOR_KEYS = ("x", "x_flip", "y", "context", "context_mask")
FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPES = {**FLOAT_DTYPES, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}
_ALLOWED_DTYPES = {"x": FLOAT_DTYPES, "x_flip": FLOAT_DTYPES, "context": FLOAT_DTYPES,
                   "y": ("int64",), "context_mask": ("bool", "uint8")}
_WRITER_KEYS = ("format", "format_version", "created", "updated", "complete", "num_samples", "tensors", "shards",
                "completed_inputs")
_TMP_MARK = ".tmp-"


def shard_file_name(index: int) -> str:
    """``latents-{index:06d}.safetensors``."""
    return f"latents-{int(index):06d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored in latent shards; use one of {', '.join(DTYPES)}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...), so comparisons with a stored manifest
    are fair. ValueError for what JSON cannot hold."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"latent shard metadata must be JSON-serialisable: {err}") from None


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one, even across a
    crash: temporary file in the same directory, fsync, rename over ``path``, fsync the directory."""
    tmp = f"{path}{_TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def _differences(old: Any, new: Any, prefix: str = "") -> List[str]:
    """Dotted keys where two JSON values differ, with both values (for error messages)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for key in sorted(set(old) | set(new)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: not recorded before, now {new[key]!r}")
            elif key not in new:
                out.append(f"{where}: recorded {old[key]!r}, now absent")
            else:
                out += _differences(old[key], new[key], where)
        return out
    if old != new:
        return [f"{prefix or 'value'}: recorded {_short(old)}, now {_short(new)}"]
    return []


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- writing ----------------------------------------------------------------------------------------------------
class LatentShardWriter:
    """Append samples to a latent shard directory, one whole shard at a time (see the module docstring).

    Args:
        out_dir: the directory (created if missing). If it already holds a manifest, the writer *continues*
            it: ``meta`` and ``shard_size`` must equal the recorded ones (else a ValueError listing every
            difference), leftover temporary files are removed, and new shards are numbered after the listed
            ones (a shard file that a killed run renamed into place but never listed is overwritten).
        shard_size: samples per shard (the last shard of a finished directory may hold fewer).
        meta: JSON-serialisable description stored at the manifest's top level (no key may be one of the
            writer's own: ``format``, ``shards``, ``tensors``, ...).

    Use: ``add(tensors, completed_inputs)`` as samples are made, ``finish(completed_inputs)`` at the end.
    ``completed_inputs`` are JSON positions of the input (opaque to the writer; :mod:`fastdit.data.prepare`
    uses ``{"item", "offset", "skips"}``): entry ``i`` is where the input stood right after sample ``i``.
    Each shard records the position after its last sample; :attr:`completed_inputs` is the one of the last
    shard on disk, where a resumed run continues.
    """

    def __init__(self, out_dir: str, shard_size: int, meta: Mapping[str, Any]):
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        meta = _json_normal(dict(meta))
        clash = sorted(set(meta) & set(_WRITER_KEYS + ("shard_size",)))
        if clash:
            raise ValueError(f"meta keys {clash} are reserved for the latent shard manifest")
        self.out_dir = str(out_dir)
        self.manifest_path = os.path.join(self.out_dir, MANIFEST_NAME)
        self.shard_size = shard_size
        self.meta = meta
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"{self.out_dir}: exists and is not a directory")
        os.makedirs(self.out_dir, exist_ok=True)
        self._buffer: List[Dict[str, torch.Tensor]] = []
        self._buffer_inputs: List[Any] = []
        self._buffered = 0
        if os.path.exists(self.manifest_path):
            self.manifest = self._continue_existing()
        else:
            self.manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created": _now(),
                             "updated": _now(), "complete": False, "num_samples": 0, "shard_size": shard_size,
                             "tensors": None, "shards": [], **meta}
            self._write_manifest()

    def _continue_existing(self) -> Dict[str, Any]:
        manifest = read_manifest(self.out_dir, check_files=True, require_complete=False)
        problems = _differences({k: manifest.get(k) for k in self.meta} | {"shard_size": manifest.get("shard_size")},
                                {**self.meta, "shard_size": self.shard_size})
        extra = sorted(set(manifest) - set(_WRITER_KEYS) - {"shard_size"} - set(self.meta))
        problems += [f"{k}: recorded {_short(manifest[k])}, now absent" for k in extra]
        if problems:
            raise ValueError(f"{self.manifest_path}: this directory was written with other settings, so the new "
                             f"latents would not match the old ones; use another output directory (or delete "
                             f"this one) or repeat the original settings. Differences: " + "; ".join(problems))
        for name in os.listdir(self.out_dir):
            if _TMP_MARK in name:
                try:
                    os.remove(os.path.join(self.out_dir, name))
                except OSError:
                    pass
        return manifest

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True once :meth:`finish` ran (now or in an earlier run)."""
        return bool(self.manifest["complete"])

    @property
    def num_samples(self) -> int:
        """Samples in the shards on disk (not counting buffered ones)."""
        return int(self.manifest["num_samples"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def buffered(self) -> int:
        """Samples added but not yet written (they would be lost if the process died now)."""
        return self._buffered

    @property
    def completed_inputs(self) -> Optional[Any]:
        """The input position after the last sample on disk (None before the first shard)."""
        if self.manifest.get("completed_inputs") is not None:
            return self.manifest["completed_inputs"]
        shards = self.manifest["shards"]
        return shards[-1]["completed_inputs"] if shards else None

    # -- adding -------------------------------------------------------------------------------------------------
    def add(self, tensors: Mapping[str, torch.Tensor], completed_inputs: Sequence[Any]) -> None:
        """Append N samples: ``tensors`` maps keys of :data:`TENSOR_KEYS` to (N, ...) tensors, on any device
        (``x`` required; ``y`` int64; ``context_mask`` bool); ``completed_inputs`` has N JSON positions.
        Writes a shard each time ``shard_size`` samples are buffered."""
        if self.complete:
            raise ValueError(f"{self.out_dir}: the latent shards are complete; nothing more can be added")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        n = self._check_tensors(tensors)
        if len(completed_inputs) != n:
            raise ValueError(f"add: {n} samples but {len(completed_inputs)} input positions")
        if n == 0:
            return
        self._buffer.append(tensors)
        self._buffer_inputs.extend(_json_normal(list(completed_inputs)))
        self._buffered += n
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def finish(self, completed_inputs: Any) -> Dict[str, Any]:
        """Write the buffered samples as the last shard, mark the directory complete with the final input
        position, and return the manifest."""
        if self.complete:
            return self.manifest
        if self._buffered:
            self._flush(self._buffered)
        self.manifest["completed_inputs"] = _json_normal(completed_inputs)
        self.manifest["complete"] = True
        self._write_manifest()
        return self.manifest

    def _check_tensors(self, tensors: Dict[str, torch.Tensor]) -> int:
        unknown = sorted(set(tensors) - set(TENSOR_KEYS))
        if unknown or "x" not in tensors:
            raise ValueError(f"add: tensors need 'x' and only keys of {TENSOR_KEYS}; got {sorted(tensors)}")
        spec = {}
        for key, value in tensors.items():
            name = dtype_name(value.dtype)
            if name not in _ALLOWED_DTYPES[key]:
                raise ValueError(f"add: {key!r} has dtype {name}; allowed: {', '.join(_ALLOWED_DTYPES[key])}")
            if value.dim() < 1:
                raise ValueError(f"add: {key!r} needs a batch dimension, got a scalar")
            spec[key] = {"shape": list(value.shape[1:]), "dtype": name}
        counts = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"add: every tensor needs the same number of samples, got {counts}")
        if "x_flip" in spec and spec["x_flip"]["shape"] != spec["x"]["shape"]:
            raise ValueError(f"add: x_flip {spec['x_flip']['shape']} differs from x {spec['x']['shape']}")
        if ("context" in spec) != ("context_mask" in spec):
            raise ValueError("add: context and context_mask go together")
        if "context" in spec and spec["context"]["shape"][:1] != spec["context_mask"]["shape"]:
            raise ValueError(f"add: context {spec['context']['shape']} and context_mask "
                             f"{spec['context_mask']['shape']} disagree on the caption length")
        if self.manifest["tensors"] is None:
            self.manifest["tensors"] = spec
        elif spec != self.manifest["tensors"]:
            raise ValueError(f"{self.out_dir}: these samples have tensors {spec}, the shards so far have "
                             f"{self.manifest['tensors']} (every sample needs the same keys, shapes and dtypes)")
        return next(iter(counts.values()))

    def _flush(self, count: int) -> None:
        """Write the first ``count`` buffered samples as the next shard."""
        keys = list(self._buffer[0])
        joined = {k: torch.cat([part[k] for part in self._buffer]) for k in keys}
        shard = {k: v[:count].contiguous() for k, v in joined.items()}
        rest = {k: v[count:] for k, v in joined.items()}
        self._buffer = [rest] if self._buffered > count else []
        inputs_after = self._buffer_inputs[count - 1]
        self._buffer_inputs = self._buffer_inputs[count:]
        self._buffered -= count
        self._write_shard(shard, count, inputs_after)

    def _write_shard(self, tensors: Dict[str, torch.Tensor], count: int, completed_inputs: Any) -> None:
        from safetensors.torch import save

        index = len(self.manifest["shards"])
        name = shard_file_name(index)
        # one metadata entry: safetensors writes several in arbitrary order, and shards should be byte-identical
        # however often they are made
        data = save(tensors, metadata={"fastdit": f"{FORMAT_NAME} v{FORMAT_VERSION}, {count} samples"})
        _atomic_write(os.path.join(self.out_dir, name), data)
        entry: Dict[str, Any] = {"file": name, "num_samples": count, "bytes": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest(), "completed_inputs": completed_inputs}
        if "y" in tensors:
            entry["y_min"], entry["y_max"] = int(tensors["y"].min()), int(tensors["y"].max())
        self.manifest["shards"].append(entry)
        self.manifest["num_samples"] = int(self.manifest["num_samples"]) + count
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        data = (json.dumps(self.manifest, indent=1) + "\n").encode("utf-8")
        _atomic_write(self.manifest_path, data)


# ---- validation -------------------------------------------------------------------------------------------------
def read_manifest(directory: str, *, check_files: bool = True, verify_checksums: bool = False,
                  require_complete: bool = False) -> Dict[str, Any]:
    """The validated manifest of a latent shard directory.

    Always checked: the manifest exists and is JSON of this format and version, lists its shards with sample
    counts that add up to ``num_samples``, and describes the tensors. ``check_files`` (default): every listed
    shard exists, has the recorded size, and its safetensors header holds exactly the manifest's tensors
    with (num_samples, *shape) and the dtype (a header read, no data). ``verify_checksums``: also hash every
    shard and compare with the recorded sha256 (reads all the data). ``require_complete``: refuse a
    directory whose writer has not finished.

    Raises ValueError naming the file and the problem.
    """
    directory = str(directory)
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such latent shard directory")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing manifest (not a latent shard directory, or `fastdit prepare` has not "
                         f"started there)")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable manifest ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a latent shard manifest (format is "
                         f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r}, "
                         f"expected {FORMAT_NAME!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}; this fastdit reads "
                         f"version {FORMAT_VERSION}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_samples"), int)
            and s["num_samples"] >= 1 and os.path.basename(s["file"]) == s["file"] for s in shards):
        raise ValueError(f"{path}: 'shards' must be a list of {{'file': name, 'num_samples': n >= 1, ...}}")
    total = sum(s["num_samples"] for s in shards)
    if manifest.get("num_samples") != total:
        raise ValueError(f"{path}: num_samples is {manifest.get('num_samples')!r} but the shards hold {total}")
    if require_complete and not manifest.get("complete"):
        raise ValueError(f"{path}: the latent shards are incomplete ({len(shards)} shard(s), {total} samples "
                         f"so far): `fastdit prepare` was interrupted; run it again with the same arguments to "
                         f"finish")
    tensors = manifest.get("tensors")
    if shards or tensors is not None:
        _check_tensor_spec(tensors, path)
    if check_files or verify_checksums:
        for shard in shards:
            _check_shard_file(os.path.join(directory, shard["file"]), shard, tensors, verify_checksums)
    return manifest


def _check_tensor_spec(tensors: Any, path: str) -> None:
    if not isinstance(tensors, dict) or "x" not in tensors:
        raise ValueError(f"{path}: 'tensors' must describe at least 'x', got {tensors!r}")
    for key, spec in tensors.items():
        if key not in TENSOR_KEYS:
            raise ValueError(f"{path}: unknown tensor {key!r} (known: {', '.join(TENSOR_KEYS)})")
        if (not isinstance(spec, dict) or spec.get("dtype") not in _ALLOWED_DTYPES[key]
                or not isinstance(spec.get("shape"), list)
                or not all(isinstance(s, int) and s >= 1 for s in spec["shape"])):
            raise ValueError(f"{path}: tensor {key!r} needs a shape of positive ints and a dtype among "
                             f"{', '.join(_ALLOWED_DTYPES[key])}, got {spec!r}")
    if len(tensors["x"]["shape"]) != 3:
        raise ValueError(f"{path}: x must be (C, H, W) per sample, got {tensors['x']['shape']}")
    if "x_flip" in tensors and tensors["x_flip"]["shape"] != tensors["x"]["shape"]:
        raise ValueError(f"{path}: x_flip {tensors['x_flip']['shape']} differs from x {tensors['x']['shape']}")
    if ("context" in tensors) != ("context_mask" in tensors):
        raise ValueError(f"{path}: context and context_mask go together")


def _check_shard_file(file: str, shard: Mapping[str, Any], tensors: Mapping[str, Any], verify: bool) -> None:
    from safetensors import safe_open

    if not os.path.isfile(file):
        raise ValueError(f"{file}: missing shard (listed in the manifest)")
    size = os.path.getsize(file)
    if "bytes" in shard and size != shard["bytes"]:
        raise ValueError(f"{file}: {size} bytes, the manifest records {shard['bytes']} (truncated or replaced)")
    try:
        with safe_open(file, framework="pt") as fh:
            keys = set(fh.keys())
            found = {k: fh.get_slice(k) for k in keys}
            shapes = {k: list(s.get_shape()) for k, s in found.items()}
            dtypes = {k: str(s.get_dtype()) for k, s in found.items()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise ValueError(f"{file}: unreadable shard ({type(err).__name__}: {err})") from None
    if keys != set(tensors):
        raise ValueError(f"{file}: holds tensors {sorted(keys)}, the manifest describes {sorted(tensors)}")
    n = shard["num_samples"]
    safetensors_names = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int64": "I64", "bool": "BOOL",
                         "uint8": "U8"}
    for key, spec in tensors.items():
        expected = [n, *spec["shape"]]
        if shapes[key] != expected:
            raise ValueError(f"{file}: tensor {key!r} has shape {shapes[key]}, the manifest says {expected}")
        if dtypes[key] != safetensors_names[spec["dtype"]]:
            raise ValueError(f"{file}: tensor {key!r} has dtype {dtypes[key]}, the manifest says {spec['dtype']}")
    if verify and "sha256" in shard:
        digest = _sha256_file(file)
        if digest != shard["sha256"]:
            raise ValueError(f"{file}: sha256 {digest} does not match the manifest's {shard['sha256']} (corrupt "
                             f"or replaced shard)")


# ---- reading ----------------------------------------------------------------------------------------------------
class LatentShards(SampleSource):
    """The samples of a latent shard directory as a :class:`~fastdit.data.streaming.SampleSource` (items:
    the shard files, in manifest order).

    Each sample is ``{"x": (C, H, W), "y"?: int64 scalar, "context"?: (L, D), "context_mask"?: bool (L,)}``
    (whatever the shards store besides ``x_flip``). When flip views are stored and ``flip`` is on, ``x`` is
    the flipped view's latents with probability 1/2, decided for all positions of a shard at once by a
    generator seeded with (``seed``, epoch, the shard's file name): a function of (seed, epoch, item,
    position) only, independent of where reading starts, and a new choice every epoch (the
    :class:`~fastdit.data.streaming.StreamingDataset` passes the epoch to :meth:`read_positions`; plain
    :meth:`read` uses epoch 0).

    Args:
        directory: the shard directory (validated with :func:`read_manifest` at construction).
        seed: seeds the flip choice.
        flip: use stored flip views (no effect when none are stored).
        dtype: dtype of ``x`` and ``context`` in the samples (default float32; None: as stored).
        verify_checksums: hash every shard at construction (reads the whole data set once).
        require_complete: refuse a directory whose ``prepare`` was interrupted (default True).
        chunk_bytes: a shard is read in slices of about this many bytes (all tensors together, default
            4 MiB), each with one memory-mapped read per tensor; samples are views of the slice. Slices of a
            few MiB reuse freed memory; much larger ones page-fault fresh memory on every read and convert
            dtypes about 2x slower.

    An item that cannot be opened or read yields one ``Skip("unreadable item")`` and ends.
    """

    name = "latents"

    def __init__(self, directory: str, *, seed: int = 0, flip: bool = True,
                 dtype: Optional[torch.dtype] = torch.float32, verify_checksums: bool = False,
                 require_complete: bool = True, chunk_bytes: int = 4 << 20):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype or None, got {dtype}")
        self.directory = os.path.abspath(str(directory))
        self.manifest = read_manifest(self.directory, check_files=True, verify_checksums=verify_checksums,
                                      require_complete=require_complete)
        if not self.manifest["shards"]:
            raise ValueError(f"{os.path.join(self.directory, MANIFEST_NAME)}: the manifest lists no shards")
        self.tensors: Dict[str, Any] = self.manifest["tensors"]
        self.seed, self.dtype = seed, dtype
        self.has_flip_views = "x_flip" in self.tensors
        self.flip = bool(flip) and self.has_flip_views
        self.chunk_bytes = max(1, int(chunk_bytes))
        self._files = [os.path.join(self.directory, s["file"]) for s in self.manifest["shards"]]
        self._counts = {f: s["num_samples"] for f, s in zip(self._files, self.manifest["shards"])}
        self._keys = [k for k in ("x", "y", "context", "context_mask") if k in self.tensors]
        item_size = {"bfloat16": 2, "float16": 2, "float32": 4, "int64": 8, "bool": 1, "uint8": 1}
        self._bytes_per_sample = sum(item_size[s["dtype"]] * _prod(s["shape"]) for s in self.tensors.values())

    # -- description ----------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def latent_shape(self) -> tuple:
        """(C, H, W) of ``x``."""
        return tuple(self.tensors["x"]["shape"])

    @property
    def class_names(self) -> Optional[List[str]]:
        return self.manifest.get("class_names")

    @property
    def label_range(self) -> Optional[tuple]:
        """(min, max) of the stored labels, or None without labels."""
        shards = self.manifest["shards"]
        if "y" not in self.tensors:
            return None
        return min(s["y_min"] for s in shards), max(s["y_max"] for s in shards)

    # -- SampleSource ---------------------------------------------------------------------------------------
    def items(self) -> List[str]:
        return list(self._files)

    def flip_choices(self, item: str, epoch: int = 0) -> torch.Tensor:
        """(num_samples,) bool: which positions of shard ``item`` show the flipped view in ``epoch``."""
        n = self._counts[item]
        tag = zlib.crc32(os.path.basename(item).encode("utf-8"))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, int(epoch), tag))
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).bool()

    def read(self, item: str, start: int) -> Iterator[Union[Sample, Skip]]:
        """Samples of shard ``item`` from position ``start`` on (flip choices of epoch 0)."""
        return self._read(item, start, 1, 0)

    def read_positions(self, item: str, start: int, stride: int = 1,
                       epoch: int = 0) -> Iterator[Union[Sample, Skip]]:
        """Positions ``start, start + stride, ...`` of shard ``item``, reading only those rows (strided slices),
        with the flip choices of ``epoch``."""
        return self._read(item, start, stride, epoch)

    def _read(self, item: str, start: int, stride: int, epoch: int) -> Iterator[Union[Sample, Skip]]:
        from safetensors import safe_open

        if item not in self._counts:
            raise ValueError(f"{item}: not a shard of {self.directory}")
        if stride < 1 or start < 0:
            raise ValueError(f"read {item}: need start >= 0 and stride >= 1, got {start}, {stride}")
        n = self._counts[item]
        if start >= n:
            return
        rows = max(1, self.chunk_bytes // max(1, self._bytes_per_sample))
        rows = max(stride, rows - rows % stride)  # a multiple of the stride: chunks keep the phase
        flips = self.flip_choices(item, epoch) if self.flip else None
        try:
            handle = safe_open(item, framework="pt")
        except Exception:  # noqa: BLE001 - missing, truncated or not a safetensors file
            yield Skip("unreadable item")
            return
        keys = self._keys
        for begin in range(start, n, rows):
            end = min(n, begin + rows)
            try:
                chunk = {k: handle.get_slice(k)[begin:end] for k in keys}
                chosen = None if flips is None else flips[begin:end]
                if chosen is not None and bool(chosen.any()):
                    flipped = handle.get_slice("x_flip")[begin:end]
                    chunk["x"] = torch.where(chosen.view(-1, 1, 1, 1), flipped, chunk["x"])
            except Exception:  # noqa: BLE001 - the file changed or broke under us
                yield Skip("unreadable item")
                return
            if stride > 1:
                chunk = {k: v[::stride] for k, v in chunk.items()}
            if self.dtype is not None:
                for k in ("x", "context"):
                    if k in chunk:
                        chunk[k] = chunk[k].to(self.dtype)
            if "context_mask" in chunk:
                chunk["context_mask"] = chunk["context_mask"].bool()
            columns = [(k, chunk[k]) for k in keys]
            for i in range(columns[0][1].shape[0]):
                yield {k: v[i] for k, v in columns}


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
