"""Start-up checks of a run's output folder: it is (or can be made) a writable directory with a ``checkpoints``
directory inside, on a filesystem with room for the checkpoints the run will write, so that a run fails
before training, not at its first save."""
from __future__ import annotations

import os
import shutil
import tempfile

from torch import nn

from fastdit.training.config import ConfigError, TrainConfig

_MARGIN_BYTES = 16 * 2**20


def checkpoint_size_estimate(config: TrainConfig, model: nn.Module) -> int:
    """Bytes one checkpoint of ``model`` takes, about: the weights (parameters and buffers), AdamW's two
    moments of the trainable parameters, the fp32 EMA when enabled, the safetensors exports when on, plus
    5% and 16 MiB for the rest (RNG states, data positions, config, container overhead)."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size()
                                                                      for b in model.buffers())
    moments = 2 * sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    ema = 4 * sum(p.numel() for p in params) if config.ema.enabled else 0
    total = weights + moments + ema
    if config.checkpoint.safetensors:
        total += weights + ema
    return int(total * 1.05) + _MARGIN_BYTES


def _planned_saves(config: TrainConfig) -> int:
    every, steps = config.checkpoint.every, config.run.max_steps
    saves = steps // every if every else 0
    if config.checkpoint.save_final and (not every or steps % every):
        saves += 1
    return saves


def _writable(directory: str) -> None:
    """Create and remove a probe file in ``directory`` (raises OSError when that fails)."""
    fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=directory)
    os.close(fd)
    os.remove(probe)


def check_output_dir(config: TrainConfig, model: nn.Module) -> None:
    """Raise ``ConfigError`` naming the path (and the numbers) unless ``run.output_dir`` is, or can be made,
    a writable directory whose ``checkpoints`` entry is a directory, on a filesystem with room for the
    checkpoints (``checkpoint_size_estimate``, twice when a previous checkpoint is kept while the next one
    is written). Creates the directories."""
    run_dir = config.run.output_dir
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run.output_dir {run_dir} exists and is not a directory: choose another "
                          "run.output_dir (--output-dir DIR)")
    if os.path.exists(ckpt_dir) and not os.path.isdir(ckpt_dir):
        raise ConfigError(f"{ckpt_dir} exists and is not a directory: the run's checkpoints go there; move it "
                          "away or choose another run.output_dir")
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise ConfigError(f"cannot create run.output_dir {run_dir}: {err.strerror or err}{where}") from None
    for directory in (run_dir, ckpt_dir):
        try:
            _writable(directory)
        except OSError as err:
            raise ConfigError(f"run.output_dir {run_dir} is not writable: cannot create a file in {directory} "
                              f"({err.strerror or err})") from None
    saves = _planned_saves(config)
    if not saves:
        return
    one = checkpoint_size_estimate(config, model)
    copies = 2 if saves > 1 else 1
    needed = one * copies
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        return
    if free < needed:
        what = ("two checkpoints: the previous one is kept while the next is written" if copies == 2
                else "one checkpoint")
        raise ConfigError(f"not enough free space for checkpoints in {ckpt_dir}: about {needed} bytes "
                          f"({needed / 2**30:.2f} GiB) needed for {what} (about {one} bytes each: weights, AdamW "
                          f"moments{', EMA' if config.ema.enabled else ''}"
                          f"{', safetensors exports' if config.checkpoint.safetensors else ''}), "
                          f"{free} bytes ({free / 2**30:.2f} GiB) free; free some space or choose another "
                          "run.output_dir")
