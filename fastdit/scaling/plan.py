"""The plan of a study before it runs: the grid as a table (size, parameters, budget, training FLOPs, done or
not) and its wall-time estimate, from a few timed training steps per size (and of the digits autoencoder)
with evaluation counted as forward passes."""
from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from fastdit.scaling.files import DATA_DIR
from fastdit.training.config import TrainConfig

if TYPE_CHECKING:
    from fastdit.scaling.study import Study

POINT_OVERHEAD_S = 1.5              # per point: trainer set-up, checkpoint, evaluation set-up (estimate)
MEASURE_NOTE = "a few timed training steps per size, evaluation counted as forward passes"


def measure_step_seconds(config: TrainConfig, steps: int = 2) -> float:
    """Seconds per training step of a point's model on its device: one warm-up step, then the mean of
    ``steps`` (forward, backward, AdamW; data drawn from the point's dataset, nothing written)."""
    from fastdit.training.build import build

    config = copy.deepcopy(config)  # the cost of a step does not depend on the values: synthetic latents
    config.data.kind, config.data.path, config.data.options = "synthetic", "", {}
    config.data.prefetch = 0
    built = build(config, rank=0, world_size=1)
    device = torch.device(config.run.device if config.run.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    model = built.model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-12)
    data = iter(built.dataset)
    autocast = config.run.precision in ("bf16", "fp8")
    if config.run.precision == "fp8":
        from fastdit.modules.fp8 import enable_fp8
        enable_fp8(model, config.run.fp8_recipe)

    def one() -> None:
        batch = {k: v.to(device) for k, v in next(data).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = built.task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=[]):
        one()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def measure_autoencoder_step_seconds(device: torch.device, steps: int = 2, batch: int = 128) -> float:
    """Seconds per training step of the digits demo's autoencoder (what
    :func:`fastdit.scaling.data.prepare_digits` trains)."""
    import torch.nn.functional as F

    from fastdit.latents import ConvAutoencoder

    with torch.random.fork_rng(devices=[]):
        ae = ConvAutoencoder(image_channels=1, latent_channels=4, channels=(32, 64)).to(device)
        opt = torch.optim.AdamW(ae.parameters(), lr=1e-12)
        x = torch.rand(batch, 1, 16, 16, device=device) * 2 - 1
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()
            F.mse_loss(ae(x), x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def estimate_wall_time(study: Study, measure_steps: int = 2) -> Dict[str, Any]:
    """Seconds per step of each size of ``study`` (measured: one warm-up then ``measure_steps`` steps) and the
    wall time of the points not done yet: their steps, plus evaluation (the forward passes of the held-out
    loss and of FD sampling, as equivalent training steps) and a fixed overhead per point."""
    per_size: Dict[str, Optional[float]] = {}
    with study.threads():
        for size in study.cfg.sizes:
            point = next(p for p in study.points if p.size == size)
            per_size[size.key] = measure_step_seconds(point.config, measure_steps) if measure_steps else None
    pending = [p for p in study.points if study.load_result(p) is None]
    batch = study.points[0].global_batch
    n_eval = study.evald.latents.shape[0] if study.evald is not None else int(study.data_info.get("held_out") or 0)
    eval_forwards = n_eval * study.cfg.eval_repeats
    if study.digits and study.cfg.fd:
        eval_forwards += study.fd_count() * study.cfg.sample_steps * (2 if study.cfg.cfg_scale != 1 else 1)
    eval_steps = eval_forwards / (3 * batch)  # a training step ~ 3 forward passes of a batch
    total = 0.0
    if measure_steps:
        for p in pending:
            total += (p.steps + eval_steps) * per_size[p.size.key] + POINT_OVERHEAD_S
    extra = []
    if study.digits and not study.data_info.get("cached"):
        if measure_steps:
            with study.threads():
                ae_seconds = study.cfg.ae_steps * measure_autoencoder_step_seconds(study.device, measure_steps)
            total += ae_seconds
            extra.append(f"with the autoencoder ({study.cfg.ae_steps} steps, ~{_duration(ae_seconds)}; trained "
                         f"once, cached in {DATA_DIR}/)")
        else:
            extra.append(f"plus the autoencoder ({study.cfg.ae_steps} steps, once; cached in {DATA_DIR}/)")
    return {"seconds_per_step": per_size, "pending": [p.key for p in pending],
            "seconds": total if measure_steps else None, "eval_equivalent_steps": eval_steps,
            "not_included": extra}


def plan_lines(study: Study, estimate: Optional[Dict[str, Any]] = None) -> List[str]:
    """The grid as a table (size, params, budget, training FLOPs, done or not) and the wall-time estimate."""
    c = study.cfg
    lines = [f"scaling grid: {len(c.sizes)} size(s) x {len(c.budgets)} budget(s) = {len(study.points)} points; "
             f"global batch {study.points[0].global_batch}; device {study.device}"
             + (f"; {c.threads} CPU thread(s)" if c.threads else ""),
             f"data: {study.data_info.get('data')}; held out: {_held_out_text(study)}"]
    pending = set(estimate["pending"]) if estimate else None
    lines.append(f"  {'size':<22}{'params':>10}{'steps':>8}{'train FLOPs':>14}{'lr':>10}{'s/step':>9}  status")
    for p in study.points:
        sps = estimate["seconds_per_step"].get(p.size.key) if estimate else None
        status = "" if pending is None else ("to train" if p.key in pending else "done")
        lines.append(f"  {p.size.label:<22}{_si(p.params):>10}{p.steps:>8}{p.train_flops:>14.3e}"
                     f"{p.config.optim.lr:>10.3g}{(f'{sps:.3f}' if sps else '-'):>9}  {status}")
    span = max(p.params for p in study.points) / min(p.params for p in study.points)
    compute_span = max(p.train_flops for p in study.points) / min(p.train_flops for p in study.points)
    lines.append(f"parameters span {math.log10(span):.2f} decades; training compute spans "
                 f"{math.log10(compute_span):.2f}")
    if estimate:
        if estimate["seconds"] is None:
            lines.append("estimated wall time: not measured (--estimate-steps 0)")
        else:
            extra = estimate["not_included"]
            lines.append(f"estimated wall time: {_duration(estimate['seconds'])} for {len(estimate['pending'])} "
                         f"point(s) to train" + (f" {' '.join(extra)}" if extra else "")
                         + f" (from {MEASURE_NOTE})")
    return lines


def _held_out_text(study: Study) -> str:
    """What the points are measured on, for the plan."""
    if study.evald is not None:
        return study.evald.description
    held = study.data_info.get("held_out")
    return f"{held} held-out digits (the autoencoder is not trained yet)" if isinstance(held, int) else str(held)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
