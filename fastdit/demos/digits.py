"""The main job on embedded data: latent diffusion of the 1,797 handwritten digits scikit-learn ships.

    fastdit demo [--mode class|captions] [--task rectified_flow|ddpm] [--out DIR] [--quick]

1. Digits (8×8, 17 grey levels) are upsampled to 16×16 in [-1, 1] and split 80/20 (stratified,
   seeded) into training and held-out sets.
2. A small conv autoencoder (:class:`fastdit.latents.ConvAutoencoder`, 16×16 → 4×4×4) is trained
   through :class:`fastdit.training.Trainer`; its per-channel latent statistics come from the training
   set.
   The autoencoder is saved (with its fitted statistics) as ``DIR/autoencoder.pt`` and the training set's
   latents (with labels, and in captions mode the caption embeddings) as ``DIR/latents.pt``.
3. A class-conditional DiT (``mode="class"``, label dropout for CFG) or a caption-conditional MMDiT
   (``mode="captions"``: "a handwritten seven" through the MiniLM caption encoder, caption dropout for
   CFG) is trained on the latents with rectified flow, through the same trainer (class mode with
   ``task="ddpm"``: the same DiT with learned sigma, trained as a DDPM -- linear schedule, T = 1000,
   hybrid loss with ``variance="learned_range"`` -- and sampled with DDPM ancestral steps). Its run config
   (``DIR/denoiser/config.json``, also in each checkpoint) describes the run completely: a model preset
   with the demo's sizes, ``DIR/latents.pt`` as data, ``DIR/autoencoder.pt`` as latent space, and the
   model, objective and dataset are built from that config (:mod:`fastdit.training.build`), so
   ``fastdit sample DIR/denoiser`` rebuilds exactly the model that was trained.
4. A grid is sampled (classifier-free guidance at ``cfg_scale``, default 1 = unguided; EMA weights, Euler;
   DDPM with learned variance for ``task="ddpm"``), decoded and written as a PNG (rows = classes) and an
   ``.npz``; ``report.json`` holds the fraction of samples that a classifier trained only on real training
   digits assigns to the requested class (with its accuracy on the held-out digits beside it), and the mean
   distance from each sample to its nearest training digit against the same figure for held-out real digits
   (a model that copies its training set scores far below the held-out figure).
5. Sample quality in the features of :class:`fastdit.metrics.DigitFeatures` (a small CNN trained on the real
   training digits only, cached in ``DIR/feature_extractor/``): the Fréchet distance of the samples to the
   held-out digits beside that of as many real training digits (same class balance: the real-vs-real
   yardstick; targets: at most :data:`TARGET_FD_RATIO` times it), improved precision and recall (k = 3
   nearest-neighbour manifolds; recall target :data:`TARGET_RECALL`) and recall per class.

On CUDA the models run on fastdit's fast path (``backend="auto"``) under bf16 autocast; on CPU on the
reference path in fp32. Both training stages checkpoint under ``DIR`` (``DIR/autoencoder``,
``DIR/denoiser``): running again resumes.

Files in ``DIR``: ``autoencoder/`` and ``denoiser/`` (the two trainer runs: config.json, metrics.jsonl,
checkpoints/), ``autoencoder.pt``, ``latents.pt``, ``feature_extractor/``, ``samples.png``, ``samples.npz``,
``report.json``.
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
CAPTION_LENGTH = 16                    # tokens per caption (the MiniLM encoder's max_length)
# Registered presets the denoiser is configured from (its sizes are overridden by the demo's, see denoiser_config)
PRESETS = {"class": "DiT-S/2", "captions": "MMDiT-Tiny/2"}
AUTOENCODER_FILE = "autoencoder.pt"    # the latent space, saved with its fitted statistics
LATENTS_FILE = "latents.pt"            # the denoiser's training data
TARGET_CLASSIFIED_AS_REQUESTED = 0.9   # of the full demo (quick runs are too small to reach it)
TARGET_FD_RATIO = 2.0                  # FD(samples, held-out) at most this times FD(real training digits, held-out)
TARGET_RECALL = 0.7                    # improved recall of the samples against the held-out digits
PRECISION_RECALL_K = 3                 # k of the k-NN manifolds (Kynkäänniemi et al. 2019)
TASKS = ("rectified_flow", "ddpm")     # the denoiser's objective (DigitsDemoConfig.task)
# task="ddpm": the DDPM of the run config (keyword arguments of fastdit.diffusion.DDPM) and its sampling
DDPM_OPTIONS = {"schedule": "linear", "variance": "learned_range", "num_timesteps": 1000}
DEFAULT_SAMPLE_STEPS = {"rectified_flow": 40, "ddpm": 100}  # when DigitsDemoConfig.sample_steps is None
SAMPLER_FOR = {"rectified_flow": "euler", "ddpm": "ddpm"}


@dataclasses.dataclass
class DigitsDemoConfig:
    """Settings of the digits job (defaults: about 5 minutes on a 2-core CPU)."""
    out_dir: str = "fastdit-demo"
    mode: str = "class"                # "class" (DiT, labels) or "captions" (MMDiT, caption encoder)
    task: str = "rectified_flow"       # "rectified_flow" or "ddpm" (learned-sigma DiT; class mode only)
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
    cfg_scale: float = 1.0             # 1 = unguided. Measured (CPU, seed 0): CFG 3 gives FD 5.0x the real-vs-real
    #                                    figure and recall 0.34 (both targets missed); CFG 1 gives 1.2x and 0.81
    sample_steps: Optional[int] = None  # None: 40 Euler steps (rectified flow), 100 DDPM steps (ddpm)
    guidance_interval: Optional[Tuple[float, float]] = None  # guide only at normalised times in [lo, hi] (1 = noise)
    samples_per_class: int = 20
    held_out_fraction: float = 0.2
    progress: bool = True
    quick_run: bool = False            # set by quick(): the figures are not meaningful at that size
    precision: Optional[str] = None    # the denoiser's run.precision (None: bf16 on CUDA, fp32 on the CPU; fp8)

    def quick(self) -> "DigitsDemoConfig":
        """A short version for smoke tests (minutes → seconds; the quality figures mean nothing)."""
        return dataclasses.replace(self, ae_steps=60, dit_steps=80, samples_per_class=3, sample_steps=8,
                                   hidden_size=64, depth=2, num_heads=2, quick_run=True)

    def sampling_steps(self) -> int:
        """The sampler's steps: ``sample_steps``, or the task's default when it is None."""
        return int(self.sample_steps) if self.sample_steps is not None else DEFAULT_SAMPLE_STEPS[self.task]

    def sampler(self) -> str:
        """``"euler"`` (rectified flow) or ``"ddpm"`` (ancestral, learned variance)."""
        return SAMPLER_FOR[self.task]

    def check(self) -> "DigitsDemoConfig":
        """ValueError for a mode / task this demo does not run."""
        if self.mode not in ("class", "captions"):
            raise ValueError(f"mode must be 'class' or 'captions', got {self.mode!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.mode == "captions" and self.task != "rectified_flow":
            raise ValueError("the captions mode trains with rectified flow only")
        return self


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


def caption_embeddings(encoder, max_length: int = CAPTION_LENGTH) -> Dict[str, Any]:
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
    """The trainer settings both stages share; ``run.output_dir`` is ``<out_dir>/<stage>`` (absolute)."""
    from fastdit.training import TrainConfig

    config = TrainConfig()
    config.run.output_dir = os.path.abspath(os.path.join(cfg.out_dir, stage))
    config.run.max_steps = steps
    config.run.seed = cfg.seed
    config.run.device = device.type
    config.run.distributed = "none"
    config.run.precision = "bf16" if device.type == "cuda" else "fp32"
    if stage == "denoiser" and cfg.precision:  # the autoencoder has no DiT blocks: it keeps the default
        config.run.precision = cfg.precision
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


def _fit(config, model, task, dataset):
    from fastdit.training import Trainer

    trainer = Trainer(config, model, task, dataset)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    return trainer, summary


def train_autoencoder(cfg: DigitsDemoConfig, images: torch.Tensor, device: torch.device):
    """Train the conv AE on ``images`` through the trainer, fit its latent statistics; returns it (eval).

    The trainer's checkpoints (``<out_dir>/autoencoder/checkpoints``) hold the AE *before* its statistics are
    fitted; the AE to use is the one :func:`run` saves to ``<out_dir>/autoencoder.pt`` afterwards."""
    from fastdit.data import TensorDictDataset
    from fastdit.diffusion.task import ReconstructionTask
    from fastdit.latents import ConvAutoencoder

    torch.manual_seed(cfg.seed)
    ae = ConvAutoencoder(image_channels=1, latent_channels=4, channels=(32, 64))
    config = _trainer_config(cfg, "autoencoder", cfg.ae_steps, cfg.ae_batch, cfg.ae_lr, ema=False, device=device)
    # what this stage trains, for the record (no preset builds a ConvAutoencoder: ConvAutoencoder(**options))
    config.model.options = dict(ae.config)
    config.data.latent_shape = (1, cfg.image_size, cfg.image_size)  # the images it reconstructs
    config.data.num_classes = 0
    dataset = TensorDictDataset({"x": images}, config.data.batch_size, seed=config.run.seed)
    _, summary = _fit(config, ae, ReconstructionTask(), dataset)
    ae = ae.to(device).eval()
    ae.fit_latent_stats(images.to(device))
    with torch.no_grad():
        recon = ae.decode(ae.encode(images.to(device)))
        mse = F.mse_loss(recon, images.to(device)).item()
    return ae, {"final_loss": summary["loss"], "reconstruction_mse": mse}


def denoiser_config(cfg: DigitsDemoConfig, latent_shape: Tuple[int, int, int], device: torch.device,
                    latents_path: str, autoencoder_path: str, caption_dim: Optional[int] = None):
    """The denoiser stage's complete :class:`~fastdit.training.TrainConfig`: what
    :func:`fastdit.training.build.build_model` turns into the demo's DiT / MMDiT (a preset of
    :data:`PRESETS` with the demo's sizes, patch size 1, no learned sigma), the latents file it trains on,
    the autoencoder that decodes them, rectified flow with logit-normal times, and the demo's sampling
    settings (``task.options.sampling``). ``caption_dim``: the caption encoder's width (captions mode).
    With ``cfg.task == "ddpm"`` the DiT learns sigma (2C outputs) and the task is a DDPM of
    :data:`DDPM_OPTIONS` (linear schedule, T = 1000, hybrid loss with learned-range variance), sampled with
    the ``ddpm`` sampler."""
    cfg.check()
    config = _trainer_config(cfg, "denoiser", cfg.dit_steps, cfg.dit_batch, cfg.dit_lr, ema=True, device=device)
    options: Dict[str, Any] = {"hidden_size": cfg.hidden_size, "depth": cfg.depth, "num_heads": cfg.num_heads,
                               "patch_size": 1, "learn_sigma": cfg.task == "ddpm"}
    config.model.name = PRESETS[cfg.mode]
    config.task.name = cfg.task
    config.task.options = ({"time_sampling": "logit_normal"} if cfg.task == "rectified_flow"
                           else dict(DDPM_OPTIONS))
    config.data.path = os.path.abspath(latents_path)
    config.data.latent_shape = tuple(int(s) for s in latent_shape)
    config.data.num_classes = len(CLASS_WORDS)
    config.data.options = {"autoencoder": os.path.abspath(autoencoder_path)}
    if cfg.mode == "class":
        options["class_dropout_prob"] = cfg.cond_dropout  # label dropout (the null class) for guidance
    else:
        if caption_dim is None:
            raise ValueError("the captions mode needs the caption encoder's width (caption_dim)")
        options.update(caption_dim=int(caption_dim), qk_norm=True, pos_embed="rope")
        config.task.options["caption_dropout"] = cfg.cond_dropout
        # the default MiniLM encoder of fastdit.text, captions encoded at this length
        config.data.options["caption_encoder"] = {"max_length": CAPTION_LENGTH}
    config.model.options = options
    config.task.options["sampling"] = {"sampler": cfg.sampler(), "steps": cfg.sampling_steps(),
                                       "cfg_scale": cfg.cfg_scale, "per_class": cfg.samples_per_class}
    if cfg.guidance_interval is not None:  # so that `fastdit sample` replays it
        config.task.options["sampling"]["guidance_interval"] = list(cfg.guidance_interval)
    config.logging.sample_rows = len(CLASS_WORDS)  # grids: one row per digit (the trainer draws none itself)
    return config


def denoiser_tensors(cfg: DigitsDemoConfig, latents: torch.Tensor, labels: torch.Tensor,
                     captions: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """The denoiser's training data (what ``latents.pt`` holds): ``"x"`` latents and ``"y"`` labels; in
    captions mode also ``"context"`` / ``"context_mask"``, one of its class's caption phrasings per digit
    (fixed per digit, drawn from ``cfg.seed``)."""
    tensors: Dict[str, torch.Tensor] = {"x": latents.float().contiguous(), "y": labels.long().contiguous()}
    if cfg.mode == "captions":
        g = torch.Generator().manual_seed(cfg.seed)
        which = torch.randint(len(CAPTION_TEMPLATES), (len(labels),), generator=g)
        tensors["context"] = captions["context"][labels, which].float().contiguous()
        tensors["context_mask"] = captions["mask"][labels, which].bool().contiguous()
    return tensors


def train_denoiser(config):
    """Rectified-flow (or DDPM) training of the DiT (labels) or MMDiT (captions) of ``config`` (see
    :func:`denoiser_config`): model, objective and dataset are built from the config, as a later
    ``fastdit sample`` rebuilds them."""
    from fastdit.diffusion.task import DiffusionTask
    from fastdit.training.build import build_dataset, build_model, build_objective, model_family, sampling_options

    dataset = build_dataset(config, rank=0, world_size=1)  # reads data.path
    model = build_model(config)
    objective = build_objective(config, model)
    sampling_options(config, objective)  # check the recorded sampling settings
    _, H, W = config.data.latent_shape
    if model_family(config) == "DiT":
        task = DiffusionTask(objective, ("y",), flops_per_sample=model.flops_per_sample(H, W, training=True))
    else:
        caption_len = dataset.tensors["context"].shape[1]
        task = DiffusionTask(objective, ("context", "context_mask"),
                             caption_dropout=config.task.options["caption_dropout"],
                             flops_per_sample=model.flops_per_sample(H, W, caption_len=caption_len, training=True))
    trainer, summary = _fit(config, model, task, dataset)
    return model, trainer.ema, objective, {"final_loss": summary["loss"], "parameters": sum(
        p.numel() for p in model.parameters()), "model": config.model.name, "config": os.path.join(
        config.run.output_dir, "config.json")}


# ---------------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_digits(cfg: DigitsDemoConfig, model, ema, objective, ae, latent_shape, device: torch.device,
                  captions: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``samples_per_class`` images of each class (class-major order) in [-1, 1], with CFG, from the EMA
    weights (Euler for rectified flow; DDPM ancestral steps with the learned variance for ``task="ddpm"``);
    returns (images (10·k, 1, S, S) on CPU, requested labels)."""
    from fastdit.diffusion import sample

    k = cfg.samples_per_class
    labels = torch.arange(10).repeat_interleave(k)
    model.eval()
    if cfg.mode == "class":
        cond = {"y": labels.to(device)}
        uncond = {"y": torch.full_like(labels, model.null_class).to(device)}
    else:
        # sample with the first phrasing ("a handwritten seven"); uncond = the null caption (no tokens, zero
        # embeddings: what CaptionEncoder.encode([""]) gives and what caption dropout trains on)
        ctx, mask = captions["context"][labels, 0].to(device), captions["mask"][labels, 0].to(device)
        cond = {"context": ctx, "context_mask": mask}
        uncond = {"context": torch.zeros_like(ctx), "context_mask": torch.zeros_like(mask)}
    swap = ema.swap() if ema is not None else _nullcontext()
    with swap:
        extra = {"variance": DDPM_OPTIONS["variance"]} if cfg.task == "ddpm" else {}
        latents = sample(model, (len(labels), *latent_shape), cond, uncond, cfg_scale=cfg.cfg_scale,
                         sampler=cfg.sampler(), steps=cfg.sampling_steps(), objective=objective, seed=cfg.seed,
                         guidance_interval=cfg.guidance_interval,
                         device=device, progress=cfg.progress, **extra)
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


def real_reference_indices(train_labels: torch.Tensor, sample_labels: torch.Tensor, seed: int) -> np.ndarray:
    """Indices of real training digits with the samples' class counts (drawn without replacement, seeded):
    the real-vs-real yardstick is computed at the same sample count and class balance as the samples."""
    rng = np.random.default_rng(seed)
    train, want = train_labels.numpy(), sample_labels.numpy()
    picked = []
    for c in np.unique(want):
        pool = np.flatnonzero(train == c)
        n = int((want == c).sum())
        if n > len(pool):
            raise ValueError(f"{n} samples of class {c} but only {len(pool)} real training digits of it")
        picked.append(rng.choice(pool, n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def feature_metrics(sample_features: np.ndarray, reference_features: np.ndarray, held_features: np.ndarray,
                    held_labels: np.ndarray, k: int = PRECISION_RECALL_K) -> Dict[str, Any]:
    """FD, precision and recall of the samples against the held-out real digits, beside the same figures for
    real training digits drawn at the samples' count and class balance (``reference_features``, the
    yardstick). ``recall_per_class[c]``: the fraction of held-out real digits of class c inside the samples'
    manifold (the per-class terms of ``recall``)."""
    from fastdit.metrics import frechet_distance, manifold_membership, precision_recall

    held_labels = np.asarray(held_labels)
    fd_samples = frechet_distance(sample_features, held_features)
    fd_real = frechet_distance(reference_features, held_features)
    precision, recall = precision_recall(held_features, sample_features, k=k)
    precision_real, recall_real = precision_recall(held_features, reference_features, k=k)
    covered = manifold_membership(sample_features, held_features, k)
    covered_real = manifold_membership(reference_features, held_features, k)
    classes = [int(c) for c in np.unique(held_labels)]
    return {
        "fd_samples_vs_held_out": fd_samples,
        "fd_real_train_vs_held_out": fd_real,
        "fd_ratio": fd_samples / fd_real if fd_real > 0 else float("inf"),
        "fd_sample_count": int(len(sample_features)),
        "precision": precision,
        "recall": recall,
        "recall_per_class": {str(c): float(covered[held_labels == c].mean()) for c in classes},
        "precision_real_train": precision_real,
        "recall_real_train": recall_real,
        "recall_per_class_real_train": {str(c): float(covered_real[held_labels == c].mean()) for c in classes},
        "precision_recall_k": int(k),
    }


def evaluate_quality(train_images, train_labels, held_images, held_labels, samples, sample_labels, seed: int,
                     cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """:func:`feature_metrics` in the features of :class:`fastdit.metrics.DigitFeatures` (a small CNN trained on
    the real training digits only, cached in ``cache_dir``), with the extractor's held-out accuracy."""
    from fastdit.metrics import DigitFeatures

    extractor = DigitFeatures.fit(train_images, train_labels, seed=seed, cache_dir=cache_dir)
    reference = real_reference_indices(train_labels, sample_labels, seed)
    out = feature_metrics(extractor.features(samples), extractor.features(train_images[reference]),
                          extractor.features(held_images), held_labels.numpy())
    return {"feature_extractor": f"fastdit.metrics.DigitFeatures ({DigitFeatures.feature_dim}-d penultimate layer "
                                 f"of a CNN trained on the real training digits)",
            "feature_extractor_held_out_accuracy": extractor.accuracy(held_images, held_labels), **out}


# ---------------------------------------------------------------------------------------------- the job

def _caption_encoder(device: torch.device):
    from fastdit.text import CaptionEncoder

    try:
        return CaptionEncoder(device=str(device))
    except ImportError as err:
        raise RuntimeError(f"the captions mode needs the MiniLM caption encoder: {err}") from None


def run(cfg: DigitsDemoConfig) -> Dict[str, Any]:
    """Run the whole job; writes ``autoencoder.pt``, ``latents.pt``, the two trainer runs ``autoencoder/`` and
    ``denoiser/``, ``samples.png``, ``samples.npz`` and ``report.json`` into ``cfg.out_dir`` and returns the
    report."""
    from fastdit.training import save_image_grid
    from fastdit.training.build import build_latent_space, save_autoencoder

    cfg.check()
    device = pick_device(cfg.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    started = time.perf_counter()
    images, labels = load_digit_images(cfg.image_size)
    train_idx, held_idx = split_held_out(labels, cfg.held_out_fraction, cfg.seed)
    train_images, train_labels = images[train_idx], labels[train_idx]
    held_images, held_labels = images[held_idx], labels[held_idx]
    print(f"digits: {len(train_idx)} training, {len(held_idx)} held out, {cfg.image_size}x{cfg.image_size}; "
          f"device {device}; mode {cfg.mode}; task {cfg.task}", flush=True)

    captions, caption_dim = None, None
    if cfg.mode == "captions":
        encoder = _caption_encoder(device)
        captions, caption_dim = caption_embeddings(encoder, CAPTION_LENGTH), encoder.embed_dim
        del encoder

    print(f"[1/3] autoencoder: {cfg.ae_steps} steps", flush=True)
    t0 = time.perf_counter()
    ae, ae_info = train_autoencoder(cfg, train_images, device)
    ae_info["seconds"] = time.perf_counter() - t0
    ae_path = os.path.join(cfg.out_dir, AUTOENCODER_FILE)
    save_autoencoder(ae, ae_path)  # after fit_latent_stats: the statistics travel in the state dict
    ae_info["latent_mean"] = ae.latent_mean.tolist()
    ae_info["latent_std"] = ae.latent_std.tolist()
    with torch.no_grad():
        latents = torch.cat([ae.encode(b.to(device)) for b in train_images.split(512)]).cpu()
    latent_shape = tuple(latents.shape[1:])
    latents_path = os.path.join(cfg.out_dir, LATENTS_FILE)
    torch.save(denoiser_tensors(cfg, latents, train_labels, captions), latents_path)

    print(f"[2/3] {'DiT' if cfg.mode == 'class' else 'MMDiT'} ({cfg.task}) on {latent_shape} latents: "
          f"{cfg.dit_steps} steps", flush=True)
    t0 = time.perf_counter()
    config = denoiser_config(cfg, latent_shape, device, latents_path, ae_path, caption_dim)
    model, ema, objective, dit_info = train_denoiser(config)
    dit_info["seconds"] = time.perf_counter() - t0

    sampler_name = "Euler" if cfg.sampler() == "euler" else "DDPM (learned variance)"
    print(f"[3/3] sampling {cfg.samples_per_class} per class, CFG {cfg.cfg_scale}, {cfg.sampling_steps()} "
          f"{sampler_name} steps", flush=True)
    # decode through the saved autoencoder, as `fastdit sample` will (it is the AE used above, statistics included)
    latent_space = build_latent_space(config).to(device)
    samples, sample_labels = sample_digits(cfg, model, ema, objective, latent_space, latent_shape, device, captions)
    grid_path = os.path.join(cfg.out_dir, "samples.png")
    # 4x nearest-neighbour upscaling: a 16x16 digit is too small to look at
    save_image_grid(F.interpolate(samples, scale_factor=4, mode="nearest"), grid_path, rows=10)
    np.savez_compressed(os.path.join(cfg.out_dir, "samples.npz"), images=((samples + 1) / 2).numpy(),
                        labels=sample_labels.numpy(),
                        captions=np.array([captions["captions"][c][0] for c in sample_labels.tolist()]
                                          if captions else [], dtype=str))
    metrics = evaluate(train_images, train_labels, held_images, held_labels, samples, sample_labels, cfg.seed)
    metrics.update(evaluate_quality(train_images, train_labels, held_images, held_labels, samples, sample_labels,
                                    cfg.seed, cache_dir=os.path.join(cfg.out_dir, "feature_extractor")))
    met = metrics["samples_classified_as_requested"] >= TARGET_CLASSIFIED_AS_REQUESTED
    quality_met = {"fd": bool(metrics["fd_ratio"] <= TARGET_FD_RATIO),
                   "recall": bool(metrics["recall"] >= TARGET_RECALL)}
    report = {
        "job": "fastdit digits demo",
        "mode": cfg.mode,
        "task": cfg.task,
        "sampling": {"sampler": cfg.sampler(), "steps": cfg.sampling_steps(), "cfg_scale": cfg.cfg_scale,
                     **({"variance": DDPM_OPTIONS["variance"]} if cfg.task == "ddpm" else {}),
                     **({"guidance_interval": list(cfg.guidance_interval)} if cfg.guidance_interval else {})},
        "quick": bool(cfg.quick_run),
        "conditioning": "class labels" if cfg.mode == "class" else "captions like 'a handwritten seven' (MiniLM)",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        **metrics,
        "target_classified_as_requested": TARGET_CLASSIFIED_AS_REQUESTED,
        "target_met": None if cfg.quick_run else bool(met),  # the target is the full demo's
        "target_fd_ratio": TARGET_FD_RATIO,
        "target_recall": TARGET_RECALL,
        "quality_targets_met": None if cfg.quick_run else quality_met,
        "autoencoder": ae_info,
        "denoiser": dit_info,
        "seconds_total": time.perf_counter() - started,
        "files": {"grid": grid_path, "samples": os.path.join(cfg.out_dir, "samples.npz"),
                  "autoencoder": ae_path, "latents": latents_path,
                  "denoiser_run": config.run.output_dir,
                  "autoencoder_run": os.path.abspath(os.path.join(cfg.out_dir, "autoencoder"))},
        "config": dataclasses.asdict(cfg),
    }
    with open(os.path.join(cfg.out_dir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    return report


def summary_lines(report: Dict[str, Any]) -> List[str]:
    """The console summary of a report. A quick run's figures are not compared with the target (a smoke run
    is far too small to reach it); a full run's are, and the line says whether the target was met."""
    got, target = report["samples_classified_as_requested"], report["target_classified_as_requested"]
    classifier = f"the classifier scores {report['classifier_held_out_accuracy']:.1%} on held-out real digits"
    if report.get("quick"):
        first = (f"samples classified as the requested digit: {got:.1%} ({classifier}) -- quick smoke run: figures "
                 f"are not meaningful at this size; the {target:.0%} target applies to the full demo")
    else:
        first = (f"samples classified as the requested digit: {got:.1%} (target {target:.0%}: "
                 f"{'met' if got >= target else 'MISSED'}; {classifier})")
    lines = [
        first,
        f"mean distance to the nearest training digit: samples {report['mean_nearest_train_distance_samples']:.2f}, "
        f"held-out real digits {report['mean_nearest_train_distance_held_out_real']:.2f}",
    ]
    if "fd_samples_vs_held_out" in report:
        lines += _quality_lines(report)
    return lines + [
        f"wrote {report['files']['grid']}, {report['files']['samples']} and report.json "
        f"in {report['seconds_total']:.0f} s",
    ]


def _quality_lines(report: Dict[str, Any]) -> List[str]:
    """FD / precision / recall lines; verdicts only for a full run (``quality_targets_met`` not None)."""
    verdicts = None if report.get("quick") else report.get("quality_targets_met")

    def verdict(name: str, text: str) -> str:
        if verdicts is None:
            return ""
        return f" (target {text}: {'met' if verdicts.get(name) else 'MISSED'})"

    ratio_target = report.get("target_fd_ratio", TARGET_FD_RATIO)
    recall_target = report.get("target_recall", TARGET_RECALL)
    per_class = " ".join(f"{c}:{v:.2f}" for c, v in sorted(report["recall_per_class"].items()))
    return [
        f"Frechet distance to the held-out real digits (CNN features): {report['fd_sample_count']} samples "
        f"{report['fd_samples_vs_held_out']:.2f}, as many real training digits "
        f"{report['fd_real_train_vs_held_out']:.2f} "
        f"(ratio {report['fd_ratio']:.2f}){verdict('fd', f'<= {ratio_target:g}x')}",
        f"precision {report['precision']:.2f}, recall {report['recall']:.2f}"
        f"{verdict('recall', f'>= {recall_target:g}')} (real training digits: {report['precision_real_train']:.2f}, "
        f"{report['recall_real_train']:.2f}; k={report['precision_recall_k']})",
        f"recall per class: {per_class}",
    ]
