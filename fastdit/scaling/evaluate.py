"""Measuring a trained model of the grid: the diffusion loss on the held-out latents (fixed noise and times,
so points are comparable), decoded samples with the held-out labels, and their Frechet distance (and precision /
recall) against the held-out real digits -- also for real training digits, the FD yardstick."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from fastdit.scaling.data import EvalData
from fastdit.scaling.files import finite_or_none


@torch.no_grad()
def held_out_loss(model, objective, evald: EvalData, seed: int, repeats: int, device: torch.device,
                  batch: int = 512) -> float:
    """Mean diffusion loss of ``model`` over the held-out latents, ``repeats`` (noise, t) draws each from a
    generator seeded with ``seed`` (the same draws for every model of the grid)."""
    g = torch.Generator().manual_seed(int(seed))
    total, count = 0.0, 0
    x = evald.latents.repeat(repeats, 1, 1, 1)
    cond = {k: v.repeat(repeats, *([1] * (v.dim() - 1))) for k, v in evald.cond.items()}
    for start in range(0, x.shape[0], batch):
        xb = x[start:start + batch].to(device)
        cb = {k: v[start:start + batch].to(device) for k, v in cond.items()}
        loss = objective.loss(model, xb, cb, generator=g, reduction="none")
        total += float(loss.double().sum())
        count += xb.shape[0]
    return total / count


def quality_metrics(features, evald: EvalData, images: torch.Tensor) -> Dict[str, Any]:
    """FD (and precision / recall, k=3) of ``images`` against the held-out real digits, in the feature space
    of ``features`` (a :class:`fastdit.metrics.DigitFeatures`). The one place that calls fastdit.metrics."""
    from fastdit.metrics import frechet_distance, precision_recall

    real = features.features(evald.held_images)
    fake = features.features(images)
    precision, recall = precision_recall(real, fake, k=3)
    fd = frechet_distance(real, fake)
    out = {"fd": finite_or_none(fd), "precision": finite_or_none(precision), "recall": finite_or_none(recall)}
    if out["fd"] is None:
        out["fd_note"] = f"FD is not finite ({fd})"
    return out


@torch.no_grad()
def sample_images(model, objective, latent_space, evald: EvalData, n: int, steps: int, cfg_scale: float,
                  seed: int, device: torch.device) -> torch.Tensor:
    """``n`` decoded samples in [-1, 1] with the held-out digits' labels (the first ``n``), Euler, guided."""
    from fastdit.diffusion import sample

    labels = evald.cond["y"][:n].to(device)
    uncond = {"y": torch.full_like(labels, model.null_class)} if model.null_class is not None else None
    latents = sample(model, (len(labels), *evald.latents.shape[1:]), {"y": labels}, uncond,
                     cfg_scale=cfg_scale if uncond is not None else 1.0, sampler="euler", steps=steps,
                     objective=objective, seed=seed, device=device, progress=False)
    latent_space.to(device)
    return latent_space.decode(latents.float()).clamp(-1, 1).cpu()



def sample_quality(features, model, objective, latent_space, evald: EvalData, n: int, steps: int, cfg_scale: float,
                   seed: int, device: torch.device) -> Dict[str, Any]:
    """:func:`quality_metrics` of ``n`` samples of ``model`` (:func:`sample_images`); FD None with a note when
    it cannot be computed (e.g. non-finite samples)."""
    images = sample_images(model, objective, latent_space, evald, n, steps, cfg_scale, seed, device)
    try:
        return quality_metrics(features, evald, images)
    except ValueError as err:  # e.g. non-finite samples
        return {"fd": None, "fd_note": f"FD not computed: {err}"}


def real_reference(features, evald: EvalData, n: int, seed: int) -> Optional[Dict[str, Any]]:
    """:func:`quality_metrics` of ``n`` real *training* digits with the class counts of the first ``n`` held-out
    labels (drawn with ``seed``) against the held-out digits: what a perfect model would score at ``n`` samples."""
    want = evald.cond["y"][:n]
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(want).tolist():
        pool = torch.nonzero(evald.train_labels == c).flatten()
        k = int((want == c).sum())
        picked.append(pool[torch.randperm(len(pool), generator=g)[:k]])
    images = evald.train_images[torch.sort(torch.cat(picked)).values]
    try:
        out = quality_metrics(features, evald, images)
    except ValueError as err:
        return {"fd": None, "fd_note": str(err)}
    out["what"] = f"{len(images)} real training digits (the samples' class counts) vs the held-out digits"
    return out
