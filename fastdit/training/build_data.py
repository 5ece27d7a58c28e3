"""The streaming data kinds of a :class:`TrainConfig`: ``latents``, ``webdataset``, ``folder`` and ``urls``.

:func:`fastdit.training.build.build_dataset` handles ``synthetic`` and ``memory`` and hands these four here.
Each becomes a :class:`~fastdit.data.streaming.StreamingDataset` (split over ranks and DataLoader workers,
exact resume, skipped samples counted); the image kinds are wrapped in
:class:`~fastdit.data.encode.EncodedImages`, which encodes each batch through the run's latent space (and,
for an MMDiT, its caption encoder) on the training device, in the trainer's prefetch thread.

``data.path`` and ``data.options`` per kind (``num_workers`` (default 2), ``shuffle`` (true) and
``resampled`` (false: draw items with replacement instead of epochs) apply to all four):

``latents``
    a directory written by ``fastdit prepare`` (manifest + safetensors shards). ``flip`` (true): use the
    stored flipped views; ``verify_checksums`` (false). ``latent_shape`` comes from the manifest.
``webdataset``
    tar shards in the img2dataset layout: a path, glob, brace pattern or comma list (``{key}.jpg|png|webp``,
    ``{key}.txt`` caption, ``{key}.cls`` label for a DiT).
``folder``
    a directory of images; class sub-folders are the labels (sorted names -> 0, 1, ...).
``urls``
    parquet or JSONL tables (path or glob) with a ``url`` column and a caption column; ``fetch``:
    ``{"deadline_s", "max_bytes", "retries", "max_redirects", "allow_networks"}`` (private, loopback and
    link-local destinations are refused unless a CIDR here allows them), ``concurrency`` (fetch threads per
    process, 64), ``window`` (rows fetched ahead of the one handed out, 256: with stalled servers a reader
    manages about window / deadline_s rows per second), ``chunk_rows`` (1024), ``cache_mb`` (RAM cache of
    fetched bytes per process, 256), ``min_width``, ``min_height``, ``min_similarity``.

The image kinds also take ``image_size`` (default: what ``data.latent_shape`` implies through the latent
space), ``flip`` (random horizontal flips, default true) and ``max_pixels`` (larger images are refused from
their header). They train in the latent space of ``data.options.autoencoder`` / ``vae`` — or on pixels when
none is configured — and an MMDiT reads its captions through ``data.options.caption_encoder``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import torch

from fastdit.training.config import ConfigError, TrainConfig

STREAMING_KINDS = ("latents", "webdataset", "folder", "urls")
IMAGE_KINDS = ("webdataset", "folder", "urls")  # encoded on the fly: the latent shape comes from the latent space
_COMMON = ("num_workers", "shuffle", "resampled")
_IMAGE = ("image_size", "flip", "max_pixels")
STREAMING_OPTIONS = {
    "latents": _COMMON + ("flip", "verify_checksums"),
    "webdataset": _COMMON + _IMAGE,
    "folder": _COMMON + _IMAGE,
    "urls": _COMMON + _IMAGE + ("fetch", "concurrency", "window", "chunk_rows", "cache_mb", "min_width",
                                "min_height", "min_similarity"),
}
_FETCH_KEYS = ("deadline_s", "max_bytes", "retries", "max_redirects", "allow_networks")


@dataclasses.dataclass
class StreamingData:
    """What :func:`build_streaming_dataset` makes: the dataset, the latent shape it yields and, for captions,
    their length L (None without captions)."""
    dataset: Any
    latent_shape: Tuple[int, int, int]
    caption_len: Optional[int]


def _opt(options: Dict[str, Any], key: str, default, kind: type, where: str, minimum=None):
    value = options.get(key, default)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (minimum is not None and value < minimum):
        need = kind.__name__ + (f" >= {minimum}" if minimum is not None else "")
        raise ConfigError(f"data.options.{key} ({where}) must be a {need}, got {value!r}")
    return value


def _local_device(config: TrainConfig) -> torch.device:
    """The device this process trains on (where image batches are encoded)."""
    from fastdit.training.distributed import resolve_device

    try:
        return resolve_device(config.run.device, int(os.environ.get("LOCAL_RANK", "0") or 0))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"run.device: {err}") from None


def _image_size(config: TrainConfig, latent_space) -> int:
    d = config.data
    f = 1 if latent_space is None else int(latent_space.downsample_factor)
    size = d.options.get("image_size", d.latent_shape[1] * f)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.options.image_size must be a positive int, got {size!r}")
    if size % f:
        raise ConfigError(f"data.options.image_size={size} is not a multiple of the latent space's downsample "
                          f"factor {f}")
    return size


def _caption_encoder(config: TrainConfig, family: str, device: torch.device):
    """(encoder, max_length) for an MMDiT (the run's ``data.options.caption_encoder``), (None, None) for a DiT."""
    from fastdit.training.build import caption_encoder_options

    if family != "MMDiT":
        return None, None
    options = caption_encoder_options(config)
    if options is None:
        raise ConfigError(f"data.kind={config.data.kind} with an MMDiT encodes captions on the fly: name the "
                          "caption encoder in data.options.caption_encoder (e.g. {\"max_length\": 77})")
    from fastdit.text import CaptionEncoder

    try:
        encoder = CaptionEncoder(options["path"], device=device, max_length=options["max_length"])
    except ImportError as err:
        raise ConfigError(f"data.options.caption_encoder: the encoder is not installed ({err})") from None
    except ValueError as err:
        raise ConfigError(f"data.options.caption_encoder: {err}") from None
    return encoder, options["max_length"]


def _fetch_policy(options: Dict[str, Any]):
    from fastdit.data.fetch import FetchPolicy

    given = options.get("fetch", {})
    if not isinstance(given, dict):
        raise ConfigError(f"data.options.fetch must be an object with keys {', '.join(_FETCH_KEYS)}")
    unknown = sorted(set(given) - set(_FETCH_KEYS))
    if unknown:
        raise ConfigError(f"data.options.fetch: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_FETCH_KEYS)}")
    given = dict(given)
    if "allow_networks" in given:
        given["allow_networks"] = tuple(given["allow_networks"])
    try:
        return FetchPolicy(**given)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.options.fetch: {err}") from None


def build_streaming_dataset(config: TrainConfig, family: str, *, rank: int, world_size: int,
                            latent_space=None) -> StreamingData:
    """This rank's dataset of a streaming ``data.kind`` (see the module docstring). ``latent_space``: the run's
    (:func:`fastdit.training.build.build_latent_space`), used by the image kinds. Errors name the setting."""
    from fastdit.data.encode import EncodedImages
    from fastdit.data.streaming import StreamingDataset

    d = config.data
    kind, options = d.kind, d.options
    if not d.path:
        raise ConfigError(f"data.kind={kind} needs data.path")
    workers = _opt(options, "num_workers", 2, int, kind, 0)
    shuffle = _opt(options, "shuffle", True, bool, kind)
    resampled = _opt(options, "resampled", False, bool, kind)
    seed = config.run.seed
    try:
        if kind == "latents":
            from fastdit.data.latent_shards import LatentShards

            source = LatentShards(d.path, seed=seed, flip=_opt(options, "flip", True, bool, kind),
                                  verify_checksums=_opt(options, "verify_checksums", False, bool, kind))
            _check_conditioning(config, family, source)
            caption_len = source.tensors["context"]["shape"][0] if "context" in source.tensors else None
            dataset = StreamingDataset(source, d.batch_size, seed=seed, rank=rank, world_size=world_size,
                                       num_workers=workers, shuffle=shuffle, resampled=resampled)
            return StreamingData(dataset, tuple(int(s) for s in source.latent_shape), caption_len)

        size = _image_size(config, latent_space)
        flip = _opt(options, "flip", True, bool, kind)
        max_pixels = _opt(options, "max_pixels", 64_000_000, int, kind, 1)
        if kind == "webdataset":
            from fastdit.data.webdataset_images import WebDatasetImages

            source = WebDatasetImages(d.path, size, seed=seed, captions=family == "MMDiT",
                                      labels=family == "DiT", flip=flip, max_pixels=max_pixels)
        elif kind == "folder":
            from fastdit.data.folder import ImageFolder

            source = ImageFolder(d.path, size, seed=seed, flip=flip, max_pixels=max_pixels)
            if family == "DiT" and not source.labelled:
                raise ConfigError(f"data.path: {d.path} has no class sub-folders, but a DiT needs labels")
            if family == "DiT" and len(source.class_names) > d.num_classes:
                raise ConfigError(f"data.path: {d.path} has {len(source.class_names)} classes but "
                                  f"data.num_classes={d.num_classes}")
            if family == "MMDiT":
                raise ConfigError("data.kind=folder has labels, not captions: train an MMDiT on webdataset "
                                  "shards with {key}.txt captions, on urls, or on prepared latents")
        else:
            from fastdit.data.urls import UrlImages

            if family == "DiT":
                raise ConfigError("data.kind=urls has captions, not class labels: a DiT cannot train on it "
                                  "(use an MMDiT)")
            cache_mb = _opt(options, "cache_mb", 256, int, kind, 0)
            source = UrlImages(d.path, size=size, seed=seed, random_flip=flip, max_pixels=max_pixels,
                               policy=_fetch_policy(options), cache_bytes=cache_mb * 2**20,
                               concurrency=_opt(options, "concurrency", 64, int, kind, 1),
                               window=_opt(options, "window", 256, int, kind, 1),
                               chunk_size=_opt(options, "chunk_rows", 1024, int, kind, 1),
                               min_width=options.get("min_width"), min_height=options.get("min_height"),
                               min_similarity=options.get("min_similarity"))
        images = StreamingDataset(source, d.batch_size, seed=seed, rank=rank, world_size=world_size,
                                  num_workers=workers, shuffle=shuffle, resampled=resampled)
    except (ValueError, OSError) as err:
        raise ConfigError(f"data ({kind} at {d.path!r}): {err}") from None
    device = _local_device(config)
    if latent_space is not None:
        latent_space.to(device).eval()
        try:
            latent_shape = tuple(latent_space.latent_shape((3, size, size)))
        except ValueError as err:
            raise ConfigError(f"data.options.image_size={size} with RGB images: {err}") from None
    else:
        latent_shape = (3, size, size)
    encoder, caption_len = _caption_encoder(config, family, device)
    dataset = EncodedImages(images, latent_space, encoder, caption_length=caption_len, device=device)
    return StreamingData(dataset, latent_shape, caption_len)


def _check_conditioning(config: TrainConfig, family: str, source) -> None:
    """A DiT needs stored labels within num_classes; an MMDiT stored caption embeddings."""
    where = os.path.join(source.directory, "manifest.json")
    if family == "DiT":
        labels = source.label_range
        if labels is None:
            raise ConfigError(f"data.path: {where} stores no labels ('y'), but a DiT needs them")
        if labels[0] < 0 or labels[1] >= config.data.num_classes:
            raise ConfigError(f"data.path: labels in {where} span [{labels[0]}, {labels[1]}] but "
                              f"data.num_classes={config.data.num_classes}")
    elif "context" not in source.tensors:
        raise ConfigError(f"data.path: {where} stores no caption embeddings ('context'), but an MMDiT needs them "
                          "(prepare with a caption encoder)")
