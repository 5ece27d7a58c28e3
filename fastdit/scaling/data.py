"""The data of a scaling study and the held-out set every point is measured on: the digits demo's latents
(autoencoder trained once, cached in ``out_dir/data``) or a configured ``fastdit train`` dataset with a held-out
tensor file (or, for synthetic data, a draw from another seed)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch

from fastdit.scaling.files import DATA_DIR, save_tensors_atomic, write_json_atomic
from fastdit.scaling.spec import GridError, ScalingConfig
from fastdit.training.config import ConfigError, TrainConfig


@dataclasses.dataclass
class EvalData:
    """What every point is measured on: held-out latents with their conditioning and, for digits, the
    real held-out images (FD reference) and the training digits (the feature extractor's data)."""
    latents: torch.Tensor
    cond: Dict[str, torch.Tensor]
    description: str
    held_images: Optional[torch.Tensor] = None
    train_images: Optional[torch.Tensor] = None
    train_labels: Optional[torch.Tensor] = None


def _digits_settings(cfg: ScalingConfig, device: torch.device):
    from fastdit.demos.digits import DigitsDemoConfig

    return DigitsDemoConfig(out_dir=os.path.join(cfg.out_dir, DATA_DIR), seed=cfg.seed, device=str(device),
                            ae_steps=cfg.ae_steps, dit_batch=cfg.batch_size or 64, dit_lr=cfg.lr or 1e-3,
                            cfg_scale=cfg.cfg_scale, sample_steps=cfg.sample_steps, progress=False)


def prepare_digits(cfg: ScalingConfig, device: torch.device, train: bool = True
                   ) -> Tuple[Optional[TrainConfig], Optional[EvalData], Dict[str, Any]]:
    """The digits data, cached in ``out_dir/data``: the demo's autoencoder (trained once through
    :func:`fastdit.demos.digits.train_autoencoder`), the training latents (``latents.pt``, the demo's format)
    and the held-out latents (``held_out.pt``); ``data.json``, written last, marks the cache complete and
    records its settings (a cache made with others is refused). Returns the base TrainConfig (the demo's
    denoiser config), the evaluation data and an info dict; with ``train=False`` and no cache, (None, None,
    info) without training anything (for ``--dry-run``)."""
    from fastdit.demos import digits
    from fastdit.training.build import save_autoencoder

    demo = _digits_settings(cfg, device)
    data_dir = demo.out_dir
    marker = os.path.join(data_dir, "data.json")
    settings = {"seed": cfg.seed, "ae_steps": cfg.ae_steps, "image_size": demo.image_size,
                "held_out_fraction": demo.held_out_fraction}
    images, labels = digits.load_digit_images(demo.image_size)
    train_idx, held_idx = digits.split_held_out(labels, demo.held_out_fraction, demo.seed)
    info: Dict[str, Any] = {"data": "scikit-learn digits through the demo's autoencoder", "train": len(train_idx),
                            "held_out": len(held_idx), "cached": os.path.exists(marker), **settings}
    ae_path, latents_path = os.path.join(data_dir, digits.AUTOENCODER_FILE), os.path.join(data_dir, digits.LATENTS_FILE)
    held_path = os.path.join(data_dir, "held_out.pt")
    if os.path.exists(marker):
        with open(marker, "r", encoding="utf-8") as fh:
            stored = json.load(fh)
        if stored.get("settings") != settings:
            raise GridError(f"{data_dir} holds digits latents made with {stored.get('settings')}, not {settings}; "
                            f"use another output folder or the same --seed / --ae-steps")
    elif not train:
        return None, None, info
    else:
        os.makedirs(data_dir, exist_ok=True)
        t0 = time.perf_counter()
        ae, ae_info = digits.train_autoencoder(demo, images[train_idx], device)
        save_autoencoder(ae, ae_path + ".tmp")
        os.replace(ae_path + ".tmp", ae_path)
        with torch.no_grad():
            enc = lambda x: torch.cat([ae.encode(b.to(device)) for b in x.split(512)]).float().cpu()  # noqa: E731
            train_lat, held_lat = enc(images[train_idx]), enc(images[held_idx])
        save_tensors_atomic(digits.denoiser_tensors(demo, train_lat, labels[train_idx]), latents_path)
        save_tensors_atomic({"x": held_lat.contiguous(), "y": labels[held_idx].contiguous()}, held_path)
        write_json_atomic(marker, {"settings": settings, "autoencoder": ae_info,
                                   "seconds": time.perf_counter() - t0})
    held = torch.load(held_path, map_location="cpu", weights_only=True)
    base = digits.denoiser_config(demo, tuple(held["x"].shape[1:]), device, latents_path, ae_path)
    base.checkpoint.every = 0
    evald = EvalData(latents=held["x"], cond={"y": held["y"]},
                     description=f"{len(held_idx)} held-out digits (stratified {demo.held_out_fraction:.0%} split, "
                                 f"seed {cfg.seed}) through the autoencoder",
                     held_images=images[held_idx], train_images=images[train_idx], train_labels=labels[train_idx])
    return base, evald, info



def digits_plan_config(cfg: ScalingConfig, device: torch.device) -> TrainConfig:
    """The base TrainConfig the digits data would give (latents 4x4x4), for a plan made before the autoencoder
    is trained (:func:`prepare_digits` with ``train=False`` and no cache)."""
    from fastdit.demos import digits

    demo = _digits_settings(cfg, device)
    return digits.denoiser_config(demo, (4, 4, 4), device, os.path.join(demo.out_dir, "latents.pt"),
                                  os.path.join(demo.out_dir, digits.AUTOENCODER_FILE))


def prepare_configured(cfg: ScalingConfig, device: torch.device) -> Tuple[TrainConfig, EvalData, Dict[str, Any]]:
    """The base TrainConfig given (``--config``) and its held-out latents: ``cfg.held_out`` (a tensor file
    like ``data.path``), or for synthetic data a fixed draw from another seed."""
    from fastdit.data import SyntheticLatents, load_tensor_file
    from fastdit.training.build import build_dataset

    base = copy.deepcopy(cfg.base_config)
    base.model.name = base.model.name or "DiT-S/2"
    if cfg.batch_size:
        base.data.batch_size = cfg.batch_size
    if cfg.lr:
        base.optim.lr = cfg.lr
    base.run.seed = cfg.seed
    base.run.distributed = "none"
    if cfg.device != "auto" or base.run.device == "auto":
        base.run.device = device.type
    base.logging.progress_bar = False
    base.logging.sample_every = 0
    try:
        build_dataset(base)  # checks data.* and, for memory data, reads latent_shape from the file
    except ConfigError as err:
        raise GridError(f"--config: {err}") from None
    n = cfg.eval_samples
    if cfg.held_out:
        try:
            tensors = load_tensor_file(cfg.held_out)
        except ValueError as err:
            raise GridError(f"--held-out: {err}") from None
        if "x" not in tensors or "y" not in tensors:
            raise GridError(f"--held-out: {cfg.held_out} needs 'x' latents and 'y' labels (keys: {sorted(tensors)})")
        x, y = tensors["x"].float()[:n], tensors["y"].long()[:n]
        if tuple(x.shape[1:]) != tuple(base.data.latent_shape):
            raise GridError(f"--held-out: latents of shape {tuple(x.shape[1:])}, the data's are "
                            f"{tuple(base.data.latent_shape)}")
        what = f"{len(x)} latents of {cfg.held_out}"
    elif base.data.kind == "synthetic":
        draw = next(iter(SyntheticLatents(base.data.latent_shape, n, num_classes=base.data.num_classes,
                                          seed=cfg.eval_seed + 1_000_003)))
        x, y = draw["x"].float(), draw["y"].long()
        what = f"{n} synthetic latents of another seed"
    else:
        raise GridError("--held-out FILE is needed with data.kind=memory: a tensor file like data.path ('x', 'y') "
                        "that the runs do not train on")
    info = {"data": f"{base.data.kind} {base.data.path}".strip(), "held_out": what}
    return base, EvalData(latents=x, cond={"y": y}, description=what), info

