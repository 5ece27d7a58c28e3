"""The main job on embedded data: latent diffusion of the 1,797 handwritten digits scikit-learn ships.

    fastdit demo [--mode class|captions] [--out DIR] [--quick]

1. Digits (8×8, 17 grey levels) are upsampled to 16×16 in [-1, 1] and split 80/20 (stratified,
   seeded) into training and held-out sets.
2. A small conv autoencoder (:class:`fastdit.latents.ConvAutoencoder`, 16×16 → 4×4×4) is trained
   through :class:`fastdit.training.Trainer`; its per-channel latent statistics come from the training
   set.
3. A class-conditional DiT (``mode="class"``, label dropout for CFG) or a caption-conditional MMDiT
   (``mode="captions"``: "a handwritten seven" through the MiniLM caption encoder, caption dropout for
   CFG) is trained on the latents with rectified flow, through the same trainer.
4. A grid is sampled with classifier-free guidance (EMA weights, Euler), decoded and written as a PNG
   (rows = classes) and an ``.npz``; ``report.json`` holds the fraction of samples that a classifier
   trained only on real training digits assigns to the requested class (with its accuracy on the
   held-out digits beside it), and the mean distance from each sample to its nearest training digit
   against the same figure for held-out real digits (a model that copies its training set scores far
   below the held-out figure).

On CUDA the models run on fastdit's fast path (``backend="auto"``) under bf16 autocast; on CPU on the
reference path in fp32. Both training stages checkpoint under ``DIR``: running again resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastdit.backend import pick_device

CLASS_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = ["a handwritten {w}", "the digit {w}", "a {w} written by hand", "number {w}"]


@dataclasses.dataclass
class DigitsDemoConfig:
    """Settings of the digits job (defaults: about 5 minutes on a 2-core CPU)."""
    out_dir: str = "fastdit-demo"
    mode: str = "class"                # "class" (DiT, labels) or "captions" (MMDiT, caption encoder)
    image_size: int = 16               # digits are upsampled from 8×8 to this
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    ae_steps: int = 800
    ae_batch: int = 128
    ae_lr: float = 2e-3
    dit_steps: int = 2000
    dit_batch: int = 128
    dit_lr: float = 1e-3
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    cond_dropout: float = 0.1          # label / caption dropout for classifier-free guidance
    ema_decay: float = 0.999
    cfg_scale: float = 3.0
    sample_steps: int = 40
    samples_per_class: int = 20
    held_out_fraction: float = 0.2
    progress: bool = True

    def quick(self) -> "DigitsDemoConfig":
        """A short version for smoke tests (minutes → seconds; the quality figures mean little)."""
        return dataclasses.replace(self, ae_steps=60, dit_steps=80, samples_per_class=3, sample_steps=8,
                                   hidden_size=64, depth=2, num_heads=2)


# ---------------------------------------------------------------------------------------------- data

def load_digit_images(image_size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, S, S) float32 in [-1, 1] (bilinear upsampling) and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.from_numpy(digits.target.astype(np.int64))


def split_held_out(labels: torch.Tensor, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) index arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, held = train_test_split(idx, test_size=fraction, stratify=labels.numpy(), random_state=seed)
    return np.sort(train), np.sort(held)


def caption_embeddings(encoder, max_length: int = 16) -> Dict[str, Any]:
    """Every caption template for every class, encoded once: (10, T, L, D) embeddings, (10, T, L) masks,
    and the captions themselves."""
    captions = [[t.format(w=w) for t in CAPTION_TEMPLATES] for w in CLASS_WORDS]
    flat = [c for row in captions for c in row]
    emb, mask = encoder.encode(flat, max_length=max_length)
    T = len(CAPTION_TEMPLATES)
    return {"context": emb.view(10, T, *emb.shape[1:]).cpu(), "mask": mask.view(10, T, -1).cpu(),
            "captions": captions}


# ---------------------------------------------------------------------------------------------- training

def _trainer_config(cfg: DigitsDemoConfig, stage: str, steps: int, batch: int, lr: float, ema: bool,
                    device: torch.device):
    from fastdit.training import TrainConfig

    config = TrainConfig()
    config.run.output_dir = os.path.join(cfg.out_dir, stage)
    config.run.max_steps = steps
    config.run.seed = cfg.seed
    config.run.device = device.type
    config.run.distributed = "none"
    config.run.precision = "bf16" if device.type == "cuda" else "fp32"
    config.data.batch_size = batch
    config.data.kind = "memory"
    config.optim.lr = lr
    config.optim.grad_clip = 1.0
    config.schedule.kind = "cosine"
    config.schedule.warmup_steps = min(100, steps // 10)
    config.schedule.min_lr_ratio = 0.05
    config.ema.enabled = ema
    config.ema.decay = cfg.ema_decay
    config.checkpoint.every = 0          # one checkpoint at the end: a second run resumes from it
    config.checkpoint.keep_last = 1
    config.checkpoint.safetensors = False
    config.logging.every = 50
    config.logging.tensorboard = False
    config.logging.progress_bar = cfg.progress
    return config


def _fit(config, model, task, tensors: Dict[str, torch.Tensor]):
    from fastdit.data import TensorDictDataset
    from fastdit.training import Trainer

    dataset = TensorDictDataset(tensors, config.data.batch_size, seed=config.run.seed)
    trainer = Trainer(config, model, task, dataset)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    return trainer, summary


def train_autoencoder(cfg: DigitsDemoConfig, images: torch.Tensor, device: torch.device):
    """Train the conv AE on ``images`` through the trainer, fit its latent statistics; returns it (eval)."""
    from fastdit.diffusion.task import ReconstructionTask
    from fastdit.latents import ConvAutoencoder

    torch.manual_seed(cfg.seed)
    ae = ConvAutoencoder(image_channels=1, latent_channels=4, channels=(32, 64))
    config = _trainer_config(cfg, "autoencoder", cfg.ae_steps, cfg.ae_batch, cfg.ae_lr, ema=False, device=device)
    _, summary = _fit(config, ae, ReconstructionTask(), {"x": images})
    ae = ae.to(device).eval()
    ae.fit_latent_stats(images.to(device))
    with torch.no_grad():
        recon = ae.decode(ae.encode(images.to(device)))
        mse = F.mse_loss(recon, images.to(device)).item()
    return ae, {"final_loss": summary["loss"], "reconstruction_mse": mse}


def build_denoiser(cfg: DigitsDemoConfig, latent_shape: Tuple[int, int, int], caption_dim: Optional[int] = None):
    from fastdit.models import DiT, DiTConfig, MMDiT, MMDiTConfig

    C, H, W = latent_shape
    common = dict(input_size=(H, W), patch_size=1, in_channels=C, hidden_size=cfg.hidden_size, depth=cfg.depth,
                  num_heads=cfg.num_heads, learn_sigma=False)
    torch.manual_seed(cfg.seed)
    if cfg.mode == "class":
        return DiT(DiTConfig(num_classes=10, class_dropout_prob=cfg.cond_dropout, **common))
    return MMDiT(MMDiTConfig(caption_dim=caption_dim, qk_norm=True, pos_embed="rope", **common))


def train_denoiser(cfg: DigitsDemoConfig, latents: torch.Tensor, labels: torch.Tensor, device: torch.device,
                   captions: Optional[Dict[str, Any]] = None):
    """Rectified-flow training of the DiT (labels) or MMDiT (captions) on normalised latents."""
    from fastdit.diffusion import RectifiedFlow
    from fastdit.diffusion.task import DiffusionTask

    objective = RectifiedFlow(time_sampling="logit_normal")
    tensors: Dict[str, torch.Tensor] = {"x": latents}
    if cfg.mode == "class":
        model = build_denoiser(cfg, tuple(latents.shape[1:]))
        tensors["y"] = labels
        task = DiffusionTask(objective, ("y",))
    else:
        # each training digit gets one of its class's caption phrasings, fixed per digit
        g = torch.Generator().manual_seed(cfg.seed)
        which = torch.randint(len(CAPTION_TEMPLATES), (len(labels),), generator=g)
        tensors["context"] = captions["context"][labels, which]
        tensors["context_mask"] = captions["mask"][labels, which]
        model = build_denoiser(cfg, tuple(latents.shape[1:]), caption_dim=tensors["context"].shape[-1])
        task = DiffusionTask(objective, ("context", "context_mask"), caption_dropout=cfg.cond_dropout)
    H, W = latents.shape[2:]
    if cfg.mode == "class":
        task.flops_per_sample = model.flops_per_sample(H, W, training=True)
    else:
        task.flops_per_sample = model.flops_per_sample(H, W, caption_len=tensors["context"].shape[1], training=True)
    config = _trainer_config(cfg, "denoiser", cfg.dit_steps, cfg.dit_batch, cfg.dit_lr, ema=True, device=device)
    trainer, summary = _fit(config, model, task, tensors)
    return model, trainer.ema, objective, {"final_loss": summary["loss"], "parameters": sum(
        p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_digits(cfg: DigitsDemoConfig, model, ema, objective, ae, latent_shape, device: torch.device,
                  captions: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``samples_per_class`` images of each class (class-major order) in [-1, 1], with CFG, from the EMA
    weights; returns (images (10·k, 1, S, S) on CPU, requested labels)."""
    from fastdit.diffusion import sample

    k = cfg.samples_per_class
    labels = torch.arange(10).repeat_interleave(k)
    model.eval()
    if cfg.mode == "class":
        cond = {"y": labels.to(device)}
        uncond = {"y": torch.full_like(labels, model.null_class).to(device)}
    else:
        # sample with the first phrasing ("a handwritten seven"); uncond = no caption tokens at all
        ctx, mask = captions["context"][labels, 0].to(device), captions["mask"][labels, 0].to(device)
        cond = {"context": ctx, "context_mask": mask}
        uncond = {"context": torch.zeros_like(ctx), "context_mask": torch.zeros_like(mask)}
    swap = ema.swap() if ema is not None else _nullcontext()
    with swap:
        latents = sample(model, (len(labels), *latent_shape), cond, uncond, cfg_scale=cfg.cfg_scale,
                         sampler="euler", steps=cfg.sample_steps, objective=objective, seed=cfg.seed,
                         device=device, progress=cfg.progress)
        images = ae.decode(latents.float()).clamp(-1, 1)
    return images.cpu(), labels


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------- evaluation

def _features(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] → flat [0, 1] features (the classifier's and the distance's space)."""
    return ((images.float() + 1) / 2).flatten(1).numpy()


def evaluate(train_images, train_labels, held_images, held_labels, samples, sample_labels, seed: int
             ) -> Dict[str, Any]:
    """Classifier trained on real training digits only: held-out accuracy and the fraction of samples
    assigned to their requested class (overall and per class); nearest-training-neighbour L2 distances
    of samples vs held-out real digits."""
    from sklearn.svm import SVC

    xtr, xho, xs = _features(train_images), _features(held_images), _features(samples)
    clf = SVC(C=10.0, gamma="scale", random_state=seed).fit(xtr, train_labels.numpy())
    held_acc = float((clf.predict(xho) == held_labels.numpy()).mean())
    pred = clf.predict(xs)
    want = sample_labels.numpy()
    per_class = {str(c): float((pred[want == c] == c).mean()) for c in range(10)}

    def nearest(x):
        d2 = (x ** 2).sum(1)[:, None] + (xtr ** 2).sum(1)[None, :] - 2 * x @ xtr.T
        return np.sqrt(np.clip(d2, 0, None)).min(1)

    return {
        "classifier": "sklearn SVC (RBF, C=10) on 16x16 pixels of the real training digits",
        "classifier_held_out_accuracy": held_acc,
        "samples_classified_as_requested": float((pred == want).mean()),
        "samples_classified_as_requested_per_class": per_class,
        "mean_nearest_train_distance_samples": float(nearest(xs).mean()),
        "mean_nearest_train_distance_held_out_real": float(nearest(xho).mean()),
        "distance_space": "L2 over 16x16 pixels in [0, 1]",
    }


# ---------------------------------------------------------------------------------------------- the job

def _caption_encoder(device: torch.device):
    from fastdit.text import CaptionEncoder

    try:
        return CaptionEncoder(device=str(device))
    except ImportError as err:
        raise RuntimeError(f"the captions mode needs the MiniLM caption encoder: {err}") from None


def run(cfg: DigitsDemoConfig) -> Dict[str, Any]:
    """Run the whole job; writes ``samples.png``, ``samples.npz`` and ``report.json`` into ``cfg.out_dir``
    and returns the report."""
    from fastdit.training import save_image_grid

    if cfg.mode not in ("class", "captions"):
        raise ValueError(f"mode must be 'class' or 'captions', got {cfg.mode!r}")
    device = pick_device(cfg.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    started = time.perf_counter()
    images, labels = load_digit_images(cfg.image_size)
    train_idx, held_idx = split_held_out(labels, cfg.held_out_fraction, cfg.seed)
    train_images, train_labels = images[train_idx], labels[train_idx]
    held_images, held_labels = images[held_idx], labels[held_idx]
    print(f"digits: {len(train_idx)} training, {len(held_idx)} held out, {cfg.image_size}x{cfg.image_size}; "
          f"device {device}; mode {cfg.mode}", flush=True)

    captions = None
    if cfg.mode == "captions":
        captions = caption_embeddings(_caption_encoder(device))

    print(f"[1/3] autoencoder: {cfg.ae_steps} steps", flush=True)
    t0 = time.perf_counter()
    ae, ae_info = train_autoencoder(cfg, train_images, device)
    ae_info["seconds"] = time.perf_counter() - t0
    with torch.no_grad():
        latents = torch.cat([ae.encode(b.to(device)) for b in train_images.split(512)]).cpu()
    latent_shape = tuple(latents.shape[1:])

    print(f"[2/3] {'DiT' if cfg.mode == 'class' else 'MMDiT'} on {latent_shape} latents: {cfg.dit_steps} steps",
          flush=True)
    t0 = time.perf_counter()
    model, ema, objective, dit_info = train_denoiser(cfg, latents, train_labels, device, captions)
    dit_info["seconds"] = time.perf_counter() - t0

    print(f"[3/3] sampling {cfg.samples_per_class} per class, CFG {cfg.cfg_scale}, {cfg.sample_steps} Euler steps",
          flush=True)
    samples, sample_labels = sample_digits(cfg, model, ema, objective, ae, latent_shape, device, captions)
    grid_path = os.path.join(cfg.out_dir, "samples.png")
    # 4x nearest-neighbour upscaling: a 16x16 digit is too small to look at
    save_image_grid(F.interpolate(samples, scale_factor=4, mode="nearest"), grid_path, rows=10)
    np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=((samples + 1) / 2).numpy(),
                        labels=sample_labels.numpy(),
                        captions=np.array([captions["captions"][c][0] for c in sample_labels.tolist()]
                                          if captions else [], dtype=str))
    metrics = evaluate(train_images, train_labels, held_images, held_labels, samples, sample_labels, cfg.seed)
    report = {
        "job": "fastdit digits demo",
        "mode": cfg.mode,
        "conditioning": "class labels" if cfg.mode == "class" else "captions like 'a handwritten seven' (MiniLM)",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        **metrics,
        "target_classified_as_requested": 0.9,
        "autoencoder": ae_info,
        "denoiser": dit_info,
        "seconds_total": time.perf_counter() - started,
        "files": {"grid": grid_path, "samples": os.path.join(cfg.out_dir, "samples.npz")},
        "config": dataclasses.asdict(cfg),
    }
    with open(os.path.join(cfg.out_dir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    return report


def summary_lines(report: Dict[str, Any]) -> List[str]:
    return [
        f"samples classified as the requested digit: {report['samples_classified_as_requested']:.1%} "
        f"(target {report['target_classified_as_requested']:.0%}; the classifier scores "
        f"{report['classifier_held_out_accuracy']:.1%} on held-out real digits)",
        f"mean distance to the nearest training digit: samples {report['mean_nearest_train_distance_samples']:.2f}, "
        f"held-out real digits {report['mean_nearest_train_distance_held_out_real']:.2f}",
        f"wrote {report['files']['grid']}, {report['files']['samples']} and report.json "
        f"in {report['seconds_total']:.0f} s",
    ]
