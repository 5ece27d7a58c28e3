"""Encode an image source into latent shards once, so training reads latents instead of decoding and encoding
images every step (``fastdit prepare`` is the command over :func:`prepare_latents`).

The source is read in its own order, with no shuffling and no random flips: item by item, every position
from the first on (a :class:`~fastdit.data.streaming.Skip` is counted by reason and left out). Images go
through the latent space in batches, captions through the caption encoder, and the results become shards
of :mod:`fastdit.data.latent_shards`.

Resuming: every shard records where the input stood after its last sample. Running again with the same
arguments into the same directory continues after the last whole shard (nothing done twice, nothing
missed); encoding batches are cut at shard boundaries, so the shards come out the same as in an
uninterrupted run. Different arguments — another latent space or weights, caption encoder, image size,
dtype, flip views, shard size or source — are refused with the differences listed. ``batch_size`` and
``device`` may change between runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from fastdit.data.encode import images_to_unit_range
from fastdit.data.latent_shards import FLOAT_DTYPES, LatentShardWriter, dtype_name
from fastdit.data.streaming import SampleSource, Skip


@dataclasses.dataclass
class PrepareSummary:
    """What :func:`prepare_latents` did.

    num_samples / num_shards: in the directory now; samples_written / inputs_read: by this call (inputs =
    samples + skips); skips: by reason over the whole preparation (earlier interrupted runs included, up to
    the last whole shard); resumed_from: samples already on disk when this call began; seconds: this call's
    wall time; complete: every input has been read."""

    out_dir: str
    num_samples: int
    num_shards: int
    samples_written: int
    inputs_read: int
    skips: Dict[str, int]
    resumed_from: int
    seconds: float
    complete: bool

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ---- identities recorded in the manifest ------------------------------------------------------------------------
def module_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in name order): which weights made
    the latents."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON-able copy of config values (tuples -> lists; anything else odd -> its repr)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def describe_latent_space(space: torch.nn.Module) -> Dict[str, Any]:
    """The latent space's identity for the manifest: class, shapes, config, scaling / shift factors
    (``AutoencoderKLLatents``), latent statistics (``ConvAutoencoder``) and a sha256 of the weights."""
    cls = type(space)
    info: Dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}",
                            "latent_channels": int(space.latent_channels), "image_channels": int(space.image_channels),
                            "downsample_factor": int(space.downsample_factor)}
    vae = getattr(space, "vae", None)
    if vae is not None and hasattr(vae, "config"):
        config = dict(vae.config)
        info["path"] = config.get("_name_or_path") or None
        info["config"] = _plain({k: v for k, v in config.items() if not str(k).startswith("_")})
        info["scaling_factor"] = float(space.scaling_factor)
        info["shift_factor"] = None if space.shift_factor is None else float(space.shift_factor)
    elif isinstance(getattr(space, "config", None), dict):
        info["config"] = _plain(space.config)
    for name in ("latent_mean", "latent_std"):
        value = getattr(space, name, None)
        if isinstance(value, torch.Tensor):
            info[name] = [float(v) for v in value.detach().cpu().flatten()]
    info["weights_sha256"] = module_sha256(space)
    return info


def describe_caption_encoder(encoder: Any, max_length: Optional[int]) -> Dict[str, Any]:
    """The caption encoder's identity for the manifest: class, path, max_length, embedding width and a sha256
    of its model's weights (when it has a ``model`` module)."""
    cls = type(encoder)
    path = getattr(encoder, "path", None)
    dim = getattr(encoder, "embed_dim", None)
    info: Dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}",
                            "path": None if path is None else str(path), "max_length": max_length,
                            "embed_dim": None if dim is None else int(dim)}
    model = getattr(encoder, "model", None)
    if isinstance(model, torch.nn.Module):
        info["weights_sha256"] = module_sha256(model)
    return info


def describe_source(source: SampleSource, items: List[str]) -> Dict[str, Any]:
    """The source's identity: kind, class, how many items, a hash of the item list (and of ``source.files``
    when it has such a list) and the first item."""
    cls = type(source)
    info = {"name": getattr(source, "name", cls.__name__), "class": f"{cls.__module__}.{cls.__qualname__}",
            "num_items": len(items), "items_sha256": hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest(),
            "first_item": items[0] if items else None}
    files = getattr(source, "files", None)  # a file listing (ImageFolder): items alone may not show a change
    if isinstance(files, list):
        info["files_sha256"] = hashlib.sha256(repr(files).encode("utf-8")).hexdigest()
    return info


def resolve_device(device: Any) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- the encoder loop ---------------------------------------------------------------------------------------------
class _Pending:
    """Samples read but not yet encoded: images, labels, captions and the input position after each."""

    def __init__(self):
        self.images: List[torch.Tensor] = []
        self.labels: List[int] = []
        self.captions: List[str] = []
        self.positions: List[Dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.images)


def _sample_fields(sample: Mapping[str, Any], where: str, image_size: int) -> Tuple[torch.Tensor, Optional[int],
                                                                                        Optional[str]]:
    if not isinstance(sample, Mapping) or "image" not in sample:
        raise ValueError(f"{where}: a sample needs 'image' (uint8 (3, S, S)); got "
                         f"{sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__}")
    image = torch.as_tensor(sample["image"])
    if image.dtype != torch.uint8 or tuple(image.shape) != (3, image_size, image_size):
        raise ValueError(f"{where}: image is {image.dtype} {tuple(image.shape)}, expected uint8 (3, {image_size}, "
                         f"{image_size}) (the source's image size must equal image_size)")
    label = sample.get("y")
    if label is not None:
        label_t = torch.as_tensor(label)
        if label_t.numel() != 1 or label_t.is_floating_point() or label_t.dtype == torch.bool:
            raise ValueError(f"{where}: label y must be one integer, got {label!r}")
        label = int(label_t.reshape(()))
    caption = sample.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"{where}: caption must be a string, got {type(caption).__name__}")
    return image, label, caption


def prepare_latents(source: SampleSource, out_dir: str, *, latent_space: torch.nn.Module,
                    caption_encoder: Optional[Any] = None, image_size: int, shard_size: int = 4096,
                    batch_size: int = 64, device: Any = "cpu", flip_views: bool = False,
                    dtype: torch.dtype = torch.bfloat16, progress: bool = True,
                    caption_max_length: Optional[int] = None, latent_space_info: Optional[Mapping[str, Any]] = None,
                    meta: Optional[Mapping[str, Any]] = None) -> PrepareSummary:
    """Encode every sample of ``source`` into latent shards in ``out_dir`` (resumable; see the module docstring).

    Args:
        source: a SampleSource of images: samples ``{"image": uint8 (3, S, S), "y"?: int, "caption"?: str}``
            with S == ``image_size`` (the source resizes and crops; it must not flip at random).
        out_dir: the shard directory (created; an existing one of the same arguments is continued).
        latent_space: a :class:`fastdit.latents.LatentSpace`; moved to ``device``; ``encode`` gets images in
            [-1, 1], (B, 3, S, S), and its latents are stored as ``x`` (B, C, S/f, S/f) in ``dtype``.
        caption_encoder: ``encode(captions, max_length) -> (embeddings (B, L, D), mask (B, L))`` (a
            :class:`fastdit.text.CaptionEncoder`); given, every sample needs a caption, stored as ``context``
            (``dtype``) and ``context_mask`` (bool). Without one, captions are ignored.
        image_size: S; must fit the latent space (checked before anything is read).
        shard_size: samples per shard. batch_size: images per ``encode`` call. device: ``"auto"``, ``"cpu"``,
            ``"cuda"``, ...
        flip_views: also store ``x_flip``, the latents of each image mirrored left-right.
        dtype: stored float dtype (bfloat16, float16 or float32).
        progress: a tqdm progress bar on stderr.
        caption_max_length: L (default: the encoder's ``max_length`` attribute).
        latent_space_info: extra identity of the latent space for the manifest (e.g. ``{"path": ...}``).
        meta: extra JSON description for the manifest (compared when resuming, like everything recorded).

    Returns a :class:`PrepareSummary`. Errors in the data (a wrong image size, a sample without a caption
    when captions are encoded) are ValueErrors naming the item and position.
    """
    started = time.perf_counter()
    for name, value in (("image_size", image_size), ("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype}")
    try:
        latent_shape = latent_space.latent_shape((3, image_size, image_size))
    except ValueError as err:
        raise ValueError(f"image size {image_size} does not fit the latent space {type(latent_space).__name__}: "
                         f"{err}") from None
    if caption_encoder is not None and caption_max_length is None:
        caption_max_length = getattr(caption_encoder, "max_length", None)
    if getattr(source, "flip", False) is True:
        raise ValueError(f"the {getattr(source, 'name', 'image')} source flips images at random, which would be "
                         f"baked into the latents; build it with flip=False (flip_views=True stores the mirrored "
                         f"view's latents as well, for random flips at training time)")
    items = list(source.items())
    if not items:
        raise ValueError(f"{getattr(source, 'name', type(source).__name__)} source lists no items: nothing to "
                         f"prepare")
    space_info = {**describe_latent_space(latent_space), **_plain(dict(latent_space_info or {}))}
    class_names = getattr(source, "class_names", None)
    record = {"latent_space": space_info,
              "caption_encoder": (None if caption_encoder is None
                                  else describe_caption_encoder(caption_encoder, caption_max_length)),
              "image_size": image_size, "latent_shape": list(latent_shape), "dtype": dtype_name(dtype),
              "flip_views": bool(flip_views), "class_names": None if class_names is None else list(class_names),
              "source": describe_source(source, items), **dict(meta or {})}
    writer = LatentShardWriter(out_dir, shard_size, record)
    resumed_from = writer.num_samples
    position = writer.completed_inputs or {"item": 0, "offset": 0, "skips": {}}
    skips: Dict[str, int] = dict(position.get("skips", {}))
    if writer.complete:
        return PrepareSummary(str(out_dir), writer.num_samples, writer.num_shards, 0, 0, skips, resumed_from,
                              time.perf_counter() - started, True)

    dev = resolve_device(device)
    latent_space.to(dev)
    written = writer.num_samples + writer.buffered

    def encode(pending: _Pending) -> None:
        nonlocal written
        images = images_to_unit_range(torch.stack(pending.images).to(dev))
        with torch.no_grad():
            tensors = {"x": latent_space.encode(images).to(dtype)}
            if flip_views:
                tensors["x_flip"] = latent_space.encode(images.flip(-1)).to(dtype)
            if pending.labels:
                tensors["y"] = torch.tensor(pending.labels, dtype=torch.int64)
            if caption_encoder is not None:
                context, mask = caption_encoder.encode(list(pending.captions), caption_max_length)
                tensors["context"], tensors["context_mask"] = context.to(dtype), mask.bool()
        writer.add(tensors, pending.positions)
        written += len(pending)

    from tqdm.auto import tqdm

    bar = tqdm(desc=f"prepare {out_dir}", unit="img", initial=resumed_from, disable=not progress, dynamic_ncols=True)
    pending = _Pending()
    has_labels: Optional[bool] = None
    inputs_read = 0
    start_item, start_offset = int(position["item"]), int(position["offset"])
    try:
        for item_index in range(start_item, len(items)):
            item = items[item_index]
            offset = start_offset if item_index == start_item else 0
            for value in source.read(item, offset):
                offset += 1
                inputs_read += 1
                where = f"{getattr(source, 'name', 'source')} item {item!r} position {offset - 1}"
                if isinstance(value, Skip):
                    skips[value.reason] = skips.get(value.reason, 0) + 1
                    if skips and inputs_read % 256 == 0:
                        bar.set_postfix(skipped=sum(skips.values()), refresh=False)
                    continue
                image, label, caption = _sample_fields(value, where, image_size)
                if has_labels is None:
                    has_labels = label is not None
                if (label is not None) != has_labels:
                    raise ValueError(f"{where}: {'no' if has_labels else 'a'} label y, unlike the samples before "
                                     f"(every sample needs one, or none does)")
                if caption_encoder is not None and caption is None:
                    raise ValueError(f"{where}: no caption, but captions are being encoded (every sample needs "
                                     f"one)")
                pending.images.append(image)
                if label is not None:
                    pending.labels.append(label)
                pending.captions.append(caption or "")
                pending.positions.append({"item": item_index, "offset": offset, "skips": dict(skips)})
                # batches never straddle a shard boundary, so a resumed run batches exactly like a fresh one
                if len(pending) == min(batch_size, shard_size - written % shard_size):
                    encode(pending)
                    bar.update(len(pending))
                    pending = _Pending()
        if len(pending):
            encode(pending)
            bar.update(len(pending))
        writer.finish({"item": len(items), "offset": 0, "skips": dict(skips)})
    finally:
        bar.close()
    return PrepareSummary(str(out_dir), writer.num_samples, writer.num_shards, writer.num_samples - resumed_from,
                          inputs_read, skips, resumed_from, time.perf_counter() - started, True)
