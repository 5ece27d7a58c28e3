"""One point of the grid (a model size trained for a budget): its TrainConfig, parameters and training FLOPs,
its recorded result (``result.json``; resume refuses one made with other settings), and the run that trains it
(resuming its trainer checkpoint), evaluates it and writes that result."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from fastdit.scaling.data import EvalData
from fastdit.scaling.evaluate import held_out_loss
from fastdit.scaling.files import POINTS_DIR, RESULT_FILE, finite_or_none, json_default, write_json_atomic
from fastdit.scaling.spec import GridError, ModelSize, ScalingConfig
from fastdit.training.config import ConfigError, TrainConfig


@dataclasses.dataclass
class GridPoint:
    """One (size, budget) run: its TrainConfig and what it costs."""
    size: ModelSize
    steps: int
    config: TrainConfig
    params: int
    flops_per_sample: float              # training (forward + backward) FLOPs of one sample
    global_batch: int

    @property
    def key(self) -> str:
        return f"{self.size.key}_s{self.steps}"

    @property
    def train_flops(self) -> float:
        return self.flops_per_sample * self.global_batch * self.steps

    @property
    def run_dir(self) -> str:
        return self.config.run.output_dir

    def spec(self, eval_spec: Dict[str, Any], out_dir: str) -> Dict[str, Any]:
        """What makes two results of this point comparable (checked on resume); a data file inside
        ``out_dir`` is named relative to it, so the folder can move."""
        c = self.config
        path = c.data.path
        if path and os.path.abspath(path).startswith(os.path.abspath(out_dir) + os.sep):
            path = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
        return {"model": {"name": c.model.name, "options": c.model.options}, "steps": self.steps,
                "batch_size": c.data.batch_size, "lr": c.optim.lr, "seed": c.run.seed,
                "task": {"name": c.task.name, "options": c.task.options},
                "data": {"kind": c.data.kind, "path": path, "num_classes": c.data.num_classes},
                "eval": eval_spec,
                # FP8 points never stand in for bf16 ones (and vice versa); bf16/fp32 follow the device as
                # they always did, so folders made before this field existed still resume
                **({"precision": c.run.precision} if c.run.precision == "fp8" else {})}


def point_config(base: TrainConfig, size: ModelSize, steps: int, out_dir: str, digits_warmup: bool) -> TrainConfig:
    """The TrainConfig of one grid point: ``base`` with the size's model, ``steps`` steps (its own warm-up and
    schedule), its own run folder, and ``run.nonfinite=error`` (a diverging point stops and is recorded)."""
    config = copy.deepcopy(base)
    options = {k: v for k, v in config.model.options.items() if k not in ("hidden_size", "depth", "num_heads")}
    if size.preset:
        config.model.name = size.preset
    options.update(size.model_options())
    config.model.options = options
    config.run.max_steps = steps
    config.run.output_dir = os.path.abspath(os.path.join(out_dir, POINTS_DIR, f"{size.key}_s{steps}"))
    config.run.nonfinite = "error"
    config.schedule.total_steps = None
    if digits_warmup:
        config.schedule.warmup_steps = min(100, steps // 10)
    elif config.schedule.warmup_steps >= steps:
        config.schedule.warmup_steps = steps // 10
    if size.lr is not None:
        config.optim.lr = size.lr
    config.checkpoint.save_final = True
    config.logging.progress_bar = False
    try:
        config.validate()
    except ConfigError as err:
        raise GridError(f"size {size.label}, {steps} steps: {err}") from None
    return config


def model_cost(config: TrainConfig) -> Tuple[int, float]:
    """(parameters, training FLOPs per sample) of a point's model, built on the meta device (no memory)."""
    from fastdit.training.build import build_model

    try:
        with torch.device("meta"):
            model = build_model(config)
    except ConfigError as err:
        raise GridError(f"model {config.model.name} {config.model.options}: {err}") from None
    _, h, w = config.data.latent_shape
    return sum(p.numel() for p in model.parameters()), float(model.flops_per_sample(h, w, training=True))


def point_result_path(point: GridPoint) -> str:
    """Where ``point``'s result is recorded: ``result.json`` in its run folder."""
    return os.path.join(point.run_dir, RESULT_FILE)


def load_point_result(point: GridPoint, eval_spec: Dict[str, Any], out_dir: str) -> Optional[Dict[str, Any]]:
    """The recorded result of ``point``, None when it has none; GridError when it was made with other
    settings (the folder belongs to another grid)."""
    path = point_result_path(point)
    if not os.path.exists(path):
        return None
    with open(path, "r", encoding="utf-8") as fh:
        result = json.load(fh)
    want = json.loads(json.dumps(point.spec(eval_spec, out_dir), default=json_default))
    if result.get("spec") != want:
        diff = sorted(k for k in set(want) | set(result.get("spec") or {})
                      if want.get(k) != (result.get("spec") or {}).get(k))
        raise GridError(f"{path} was made with other settings ({', '.join(diff)} differ): the output folder "
                        f"holds another grid; use a new --out, or the settings it was made with")
    return result


Quality = Callable[[Any, Any, torch.device], Dict[str, Any]]


def train_and_evaluate(point: GridPoint, cfg: ScalingConfig, evald: EvalData, eval_spec: Dict[str, Any],
                       quality: Optional[Quality] = None) -> Dict[str, Any]:
    """Train one point (resuming its trainer checkpoint if any), evaluate it (held-out loss of the EMA weights;
    then, when the loss is finite, ``quality(model, built, device)`` if given), write its result.json
    atomically and return the result."""
    from fastdit.training import NonFiniteError, Trainer
    from fastdit.training.build import build

    result: Dict[str, Any] = {"key": point.key, "size": point.size.label, "size_key": point.size.key,
                              "steps": point.steps, "params": point.params,
                              "flops_per_sample": point.flops_per_sample, "global_batch": point.global_batch,
                              "train_flops": point.train_flops, "lr": point.config.optim.lr,
                              "spec": point.spec(eval_spec, cfg.out_dir)}
    built = build(copy.deepcopy(point.config), rank=0, world_size=1)
    t0 = time.perf_counter()
    trainer = Trainer(built.config, built.model, built.task, built.dataset)
    try:
        summary = trainer.fit()
    except NonFiniteError as err:
        result.update(status="diverged", reason=str(err), train_seconds=time.perf_counter() - t0)
        trainer.close()
        write_json_atomic(point_result_path(point), result)
        return result
    except BaseException:
        trainer.close()
        raise
    trainer.close()
    result.update(train_seconds=time.perf_counter() - t0, final_train_loss=finite_or_none(summary["loss"]),
                  skipped_steps=summary["skipped_steps"], resumed_from=summary["resumed_from"])
    if summary["resumed_from"]:
        result["note"] = "resumed from a checkpoint: train_seconds covers the resumed part only"
    t1 = time.perf_counter()
    model = built.model.eval()
    swap = trainer.ema.swap() if trainer.ema is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    with swap:
        loss = held_out_loss(model, built.objective, evald, cfg.eval_seed, cfg.eval_repeats, device)
        result["held_out_loss"] = finite_or_none(loss)
        if not math.isfinite(loss):
            result.update(status="diverged", reason=f"held-out loss is {loss} (EMA weights)")
        else:
            result["status"] = "ok"
            if quality is not None:
                result.update(quality(model, built, device))
    result["eval_seconds"] = time.perf_counter() - t1
    result["wall_seconds"] = result["train_seconds"] + result["eval_seconds"]
    write_json_atomic(point_result_path(point), result)
    return result
