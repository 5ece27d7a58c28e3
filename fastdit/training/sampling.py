"""Sampling from a trained run: rebuild the model from a checkpoint's stored config, load its (EMA) weights,
draw a guided grid by class or by caption prompt, and write it as a PNG and an ``.npz``.

    result = sample_checkpoint("runs/dit-s", classes=[1, 7], num_per_class=8, cfg_scale=4.0)
    result = sample_checkpoint("runs/mmdit", prompts=["a handwritten seven"], num_per_class=8)

``fastdit sample`` is a thin parser over :func:`sample_checkpoint`. A path may name a checkpoint folder, a
run folder (its newest valid checkpoint), or a folder that holds one sampleable run among its sub-folders
(``fastdit-demo``: its ``denoiser`` run; the autoencoder stage beside it has no denoiser to sample).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastdit.training.checkpoint import CONFIG_FILE as CONFIG_FILE_NAME
from fastdit.training.config import TrainConfig


@dataclasses.dataclass
class SampleResult:
    """What :func:`sample_checkpoint` wrote and how."""
    png: str
    npz: str
    checkpoint: str
    step: Optional[int]
    weights: str              # "ema" or "model"
    sampler: str
    cfg_scale: float
    count: int
    rows: List[str]           # one label per grid row: the class id or the prompt
    seconds: float
    steps: int
    num_per_class: int


def _has_checkpoints(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "state.pt"))


def _is_denoiser_run(run_dir: str) -> bool:
    """A run folder whose config names a model (the autoencoder stage of the demo has none)."""
    try:
        config = TrainConfig.from_json(os.path.join(run_dir, CONFIG_FILE_NAME))
    except (OSError, ValueError):
        return False
    return bool(config.model.name)


def find_run(path: str) -> str:
    """The checkpoint folder or run folder to sample for ``path``: ``path`` itself when it holds checkpoints,
    else its one sub-folder that is a sampleable run (a denoiser with checkpoints). FileNotFoundError naming
    what was looked for, or ValueError listing the runs when there are several."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no fastdit checkpoint at or under {path}: no such file or directory")
    if _has_checkpoints(path) or not os.path.isdir(path):
        return path
    runs = sorted(os.path.join(path, name) for name in os.listdir(path)
                  if os.path.isdir(os.path.join(path, name)) and _has_checkpoints(os.path.join(path, name))
                  and _is_denoiser_run(os.path.join(path, name)))
    if len(runs) == 1:
        return runs[0]
    if runs:
        raise ValueError(f"{path} holds several runs ({', '.join(os.path.basename(r) for r in runs)}): name one")
    raise FileNotFoundError(f"no fastdit checkpoint at or under {path} (looked for {path}/checkpoints and for "
                            f"run folders with checkpoints inside it)")


def step_of(checkpoint: str) -> Optional[int]:
    m = re.search(r"step_(\d+)$", os.path.normpath(checkpoint))
    return int(m.group(1)) if m else None


def default_output(checkpoint: str, step: Optional[int]) -> str:
    """``<run>/samples/sample_step_<N>.png`` for a checkpoint folder under ``<run>/checkpoints``."""
    parent = os.path.dirname(os.path.normpath(checkpoint))
    base = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else checkpoint
    name = f"sample_step_{step:09d}" if step is not None else "sample"
    return os.path.join(base, "samples", name + ".png")


def output_paths(output: Optional[str], checkpoint: str, step: Optional[int],
                 overwrite: bool) -> Tuple[str, str, bool]:
    """(png, npz, renamed): an explicit ``output`` that exists is refused unless ``overwrite``; the default
    name gets the first free ``-2``, ``-3``, ... suffix instead of replacing an earlier grid."""
    stem = output or default_output(checkpoint, step)
    stem = stem[:-4] if stem.lower().endswith(".png") else stem

    def taken(s: str) -> bool:
        return os.path.exists(s + ".png") or os.path.exists(s + ".npz")

    if overwrite or not taken(stem):
        return stem + ".png", stem + ".npz", False
    if output:
        raise FileExistsError(f"{stem}.png or {stem}.npz exists: pass --overwrite to replace it, or another "
                              f"--output")
    k = 2
    while taken(f"{stem}-{k}"):
        k += 1
    return f"{stem}-{k}.png", f"{stem}-{k}.npz", True


def save_npz(path: str, **arrays) -> None:
    """``np.savez`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


# what `fastdit sample` uses when neither the command line nor the run's task.options.sampling says
DEFAULTS = {"steps": 50, "cfg_scale": 4.0, "per_class": 4}


def recorded_settings(config: TrainConfig) -> Dict[str, Any]:
    """The sampling settings the run recorded (``task.options.sampling``: sampler, steps, cfg_scale,
    per_class, guidance_interval), only those it gives; they are the defaults of :func:`sample_checkpoint`
    for this run."""
    given = config.task.options.get("sampling") or {}
    return {k: given[k] for k in ("sampler", "steps", "cfg_scale", "per_class", "guidance_interval")
            if k in given} if isinstance(given, dict) else {}


def sample_checkpoint(path: str, *, classes: Optional[Sequence[int]] = None,
                      prompts: Optional[Sequence[str]] = None, num_per_class: Optional[int] = None,
                      sampler: Optional[str] = None, steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                      guidance_interval: Optional[Tuple[float, float]] = None, seed: int = 0, batch_size: int = 64,
                      device: str = "auto", precision: Optional[str] = None, use_ema: bool = True,
                      output: Optional[str] = None, overwrite: bool = False, overrides: Sequence[str] = (),
                      progress: bool = True, compile: bool = False,
                      log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
                      ) -> SampleResult:
    """Draw ``num_per_class`` guided samples per class id (DiT, or an MMDiT on label captions) or per prompt
    (an MMDiT whose run names its caption encoder) from the checkpoint at ``path``, and write the grid (one
    row per class / prompt) and an ``.npz``: ``samples`` (N, C, H, W) float32 latents, ``images``
    (N, 1|3, H', W') in [-1, 1], ``labels`` (N,) class ids (-1 for prompts), ``prompts``, and the settings.

    ``steps``, ``cfg_scale``, ``num_per_class`` and ``sampler`` left None take the run's recorded
    ``task.options.sampling`` (what its training grids used), else :data:`DEFAULTS` (sampler: the objective's).

    ``overrides``: ``section.key=value`` strings applied to the run's stored config before the model is built
    (e.g. ``model.options.backend=reference``, ``data.options.display_scale=2``). Sample i gets the same noise
    in any batch size. ``compile``: run the sampling steps through compiled graphs (``sample(compile=True)``,
    see :mod:`fastdit.diffusion.compiled`); the first batch of each size compiles, later ones reuse it.
    Errors: FileNotFoundError / ValueError (ConfigError, CheckpointError) with the path and the problem.
    """
    from fastdit.backend import pick_device
    from fastdit.diffusion import PerSampleNoise, sample
    from fastdit.training.build import (build_conditioner, caption_encoder_options, build_latent_space, build_model, build_objective,
                                        build_prompt_conditioner, check_sampler, default_sampler, display_scale,
                                        latents_to_images)
    from fastdit.training.checkpoint import load_weights, resolve_checkpoint
    from fastdit.training.metrics import save_image_grid

    if classes is not None and prompts is not None:
        raise ValueError("give class ids or prompts, not both")
    ckpt = resolve_checkpoint(find_run(path))
    config = TrainConfig.from_json(os.path.join(ckpt, CONFIG_FILE_NAME), overrides)
    recorded = {**DEFAULTS, **recorded_settings(config)}
    steps = recorded["steps"] if steps is None else steps
    cfg_scale = recorded["cfg_scale"] if cfg_scale is None else cfg_scale
    num_per_class = recorded["per_class"] if num_per_class is None else num_per_class
    sampler = sampler or recorded.get("sampler")
    if guidance_interval is None and recorded.get("guidance_interval") is not None:
        guidance_interval = tuple(float(v) for v in recorded["guidance_interval"])
    for name, value in (("steps", steps), ("num_per_class", num_per_class), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(cfg_scale, (int, float)) or not cfg_scale >= 0 or seed < 0:
        raise ValueError(f"cfg_scale and seed must be numbers >= 0, got {cfg_scale!r} and {seed!r}")
    device = pick_device(device)
    model = build_model(config)
    objective = build_objective(config, model)
    sampler = check_sampler(objective, sampler or default_sampler(objective))
    if prompts is not None:
        conditioner = build_prompt_conditioner(config, model)
        rows: List[Any] = conditioner.check(prompts)
    else:
        conditioner = build_conditioner(config, model)
        if conditioner is None:
            if caption_encoder_options(config) is not None:
                raise ValueError("this MMDiT is conditioned on captions: sample it with --prompt TEXT (class ids "
                                 "cannot condition it)")
            raise ValueError("this MMDiT was trained on captions from a file and its run names no caption encoder "
                             "(data.options.caption_encoder): neither class ids nor prompts can condition it")
        rows = conditioner.check(classes) if classes is not None else conditioner.default_classes(4)
    latent_space = build_latent_space(config)
    state, which = load_weights(ckpt, use_ema=use_ema)
    if which == "model" and use_ema:
        log(f"{ckpt} has no EMA weights; using the model's")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    if latent_space is not None:
        latent_space.to(device)
    step = step_of(ckpt)
    png, npz, renamed = output_paths(output, ckpt, step, overwrite)
    if renamed:
        log(f"{os.path.splitext(default_output(ckpt, step))[0]}.png exists; writing {png} instead")
    # a run trained with precision=fp8 samples in bf16 unless asked: the model is rebuilt with stock Linear layers
    precision = precision or ({"fp8": "bf16"}.get(config.run.precision, config.run.precision)
                              if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32", "fp8"):
        raise ValueError(f"precision must be bf16, fp32 or fp8, got {precision!r}")
    if precision == "fp8":  # FP8 GEMMs in the blocks, each weight quantised once (Fp8Linear's cache)
        from fastdit.modules.fp8 import enable_fp8
        log(str(enable_fp8(model, config.run.fp8_recipe if config.run.precision == "fp8" else "rowwise")))

    # one entry per sample, row-major: the class id or the prompt of its grid row
    per_sample = [r for r in rows for _ in range(num_per_class)]
    seeds = PerSampleNoise.create(len(per_sample), seed=seed).seeds
    if prompts is None and conditioner(torch.tensor(per_sample[:1]), "cpu")[1] is None and cfg_scale != 1:
        log("the model has no null class (class_dropout_prob=0): sampling without guidance")
        cfg_scale = 1.0
    chunks = []
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision in ("bf16", "fp8")):
        for lo in range(0, len(per_sample), batch_size):
            part = per_sample[lo:lo + batch_size]
            cond, uncond = conditioner(part if prompts is not None else torch.tensor(part), device)
            chunks.append(sample(model, (len(part), *config.data.latent_shape), cond, uncond, cfg_scale, sampler,
                                 steps, guidance_interval=guidance_interval, objective=objective,
                                 seed=seeds[lo:lo + len(part)], device=device, progress=progress,
                                 compile=compile).float().cpu())
    latents = torch.cat(chunks)
    with torch.no_grad():
        images = latents_to_images(latents.to(device), latent_space, display_scale(config)).cpu()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    save_image_grid(images, png, rows=len(rows))
    labels = per_sample if prompts is None else [-1] * len(per_sample)
    save_npz(npz, samples=latents.numpy(), labels=np.asarray(labels, dtype=np.int64), images=images.numpy(),
             classes=np.asarray(rows if prompts is None else [], dtype=np.int64),
             prompts=np.asarray(list(rows) if prompts is not None else [], dtype=str),
             step=np.asarray(-1 if step is None else step), cfg_scale=np.asarray(cfg_scale),
             steps=np.asarray(steps), seed=np.asarray(seed), sampler=np.asarray(sampler), weights=np.asarray(which))
    return SampleResult(png=png, npz=npz, checkpoint=ckpt, step=step, weights=which, sampler=sampler,
                        cfg_scale=float(cfg_scale), count=len(per_sample), rows=[str(r) for r in rows],
                        seconds=time.perf_counter() - start, steps=steps, num_per_class=num_per_class)
