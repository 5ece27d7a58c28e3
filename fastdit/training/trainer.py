"""The training loop: one process or torchrun DDP/FSDP2, compile per block, EMA, exact resume.

    trainer = Trainer(config, model, task, dataset)
    trainer.fit()       # trains until config.run.max_steps, resuming from the latest checkpoint
    trainer.close()     # closes logs and the process group this trainer created

One iteration of the (epoch-free) loop, for step = resumed step + 1 ... max_steps:

1. next batch from the dataset (this rank's shard), moved to the device;
2. ``loss = task.loss(model, batch)`` under the configured autocast, ``loss.backward()``;
3. global gradient norm (clipped to ``optim.grad_clip`` when > 0);
4. one all-reduce of a vector holding every rank's non-finite flag and loss: if any rank saw a NaN/inf
   loss or grad norm, *all* ranks skip the update together (gradients dropped; model, EMA and
   optimizer state untouched; counted as ``skipped_steps``) or all raise ``NonFiniteError``
   (``run.nonfinite``); nobody is left waiting in a collective;
5. otherwise ``optimizer.step()`` and the EMA update; the LR schedule advances every step;
6. logging, sampling and checkpointing at their step intervals.

Resume is exact: the checkpoint holds model, optimizer, scheduler, EMA, counters, and every rank's RNG
states and data position, restored last, so the continued run draws the same batches and noise as an
uninterrupted one (bitwise on CPU; on GPU as far as the kernels are deterministic). A resume needs the
same world size.

Resume policy (``checkpoint.resume``): ``auto`` takes the newest *valid* checkpoint of
``<run.output_dir>/checkpoints`` (damaged newer ones are skipped with a printed warning naming each and
the problem; none valid is a ``CheckpointError``). The checkpoint's stored config must agree with the
current one on the settings that define the model and its data (``model.*``, ``data.latent_shape``,
``data.num_classes``, ``task.name``), else ``ConfigError`` names each difference. Everything else follows
the *new* config: optimizer hyperparameters (``optim.lr``, ``betas``, ``eps``, ``weight_decay``) are
written into the loaded optimizer's param groups (AdamW's moment buffers are kept), and the LR schedule
is rebuilt from ``schedule.*`` at the checkpoint's step, so step ``k``'s LR is ``new lr * new factor(k)``;
a message lists the changed settings and which of them were applied. ``metrics.jsonl`` is cut back to the
checkpoint's step, so steps run after the checkpoint by the interrupted run are not logged twice.

Start-up checks (rank 0, agreed by all ranks before any training step): ``run.output_dir`` must be set,
be (or become) a writable directory whose ``checkpoints`` entry is a directory, and have room for the
checkpoints the run will write; each failure is a ``ConfigError`` naming the path (and the numbers). A
save that still runs out of space raises ``CheckpointWriteError`` on every rank.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from fastdit.data.base import StatefulDataset
from fastdit.data.prefetch import Prefetcher
from fastdit.data.streaming import skip_counts_of_state
from fastdit.ops.attention import attention_path_choices, set_attention_path_choices
from fastdit.training.checkpoint import CheckpointManager, CheckpointWriteError, load_state, resolve_checkpoint
from fastdit.training.config import UNSET, ConfigError, TrainConfig, config_changes, is_model_defining
from fastdit.training.distributed import DistInfo, all_gather_objects, init_distributed, shutdown
from fastdit.training.ema import EMA
from fastdit.training.metrics import (JsonlLogger, known_peak_tflops, open_tensorboard, save_image_grid,
                                      throughput, truncate_jsonl)
from fastdit.training.run_dir import check_output_dir
from fastdit.training.rng import get_rng_state, seed_everything, set_rng_state
from fastdit.training.schedule import build_scheduler
from fastdit.training.task import task_flops_per_sample, task_tokens_per_sample
from fastdit.training.utils import _is_dtensor, clean_key, clean_state_dict, unwrap_model


class NonFiniteError(RuntimeError):
    """Raised on every rank when a step's loss or gradient norm is not finite on some rank and
    ``run.nonfinite == "error"`` (or too many steps in a row were skipped)."""


def model_blocks(model: nn.Module) -> nn.ModuleList:
    """``model.blocks`` of the unwrapped model: the unit of compilation, checkpointing and sharding."""
    blocks = getattr(unwrap_model(model), "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError("this option needs the model to have a non-empty `blocks` ModuleList "
                         f"({type(unwrap_model(model)).__name__} has none)")
    return blocks


def enable_gradient_checkpointing(model: nn.Module) -> str:
    """Recompute activations per block in backward. Models with a ``gradient_checkpointing`` attribute
    are switched through it (returns ``"model"``); otherwise each element of ``model.blocks`` gets an
    instance ``forward`` that runs the original under non-reentrant ``torch.utils.checkpoint`` (returns
    ``"blocks"``). Parameter names do not change; RNG inside blocks (dropout) is replayed exactly."""
    raw = unwrap_model(model)
    if hasattr(raw, "gradient_checkpointing"):
        raw.gradient_checkpointing = True
        return "model"
    for block in model_blocks(raw):
        if getattr(block, "_fastdit_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._fastdit_checkpointed = True
    return "blocks"


def compile_blocks(model: nn.Module, **kwargs) -> None:
    """``torch.compile`` every element of ``model.blocks`` in place (``Module.compile``, so state-dict
    keys stay clean), ``fullgraph=True`` unless overridden."""
    kwargs.setdefault("fullgraph", True)
    for block in model_blocks(model):
        block.compile(**kwargs)


class Trainer:
    """Trains ``model`` on ``task`` with ``dataset`` as ``config`` says (see the module docstring).

    The constructor joins the process group (torchrun's environment variables), moves the model to its
    device, applies gradient checkpointing, per-block compile and DDP/FSDP2 wrapping, and builds the
    optimizer, LR schedule and EMA. All ranks must build the same model (same seed) and pass a
    ``dataset`` sharded for this rank (``dataset.rank``/``world_size`` are checked when present).

    The constructor also runs the start-up checks (see the module docstring): an empty ``run.output_dir``,
    an output folder or ``checkpoints`` entry that is a file, an unwritable folder or too little free space
    for the checkpoints raise ``ConfigError`` on every rank before anything is trained.

    Attributes: ``model`` (the wrapped training model), ``raw_model`` (the user's module), ``optimizer``,
    ``scheduler``, ``ema`` (or None), ``dist`` (``DistInfo``), ``step``, ``skipped_steps``, ``run_dir``.
    """

    def __init__(self, config: TrainConfig, model: nn.Module, task: Any, dataset: StatefulDataset):
        config.validate()
        config.require_output_dir()
        if not callable(getattr(task, "loss", None)):
            raise TypeError("task must have a loss(model, batch) method (see fastdit.training.TrainTask)")
        self.config, self.task, self.dataset = config, task, dataset
        run = config.run
        self.dist: DistInfo = init_distributed(run.device, run.dist_timeout_s)
        self.device = self.dist.device
        for attr, expect in (("rank", self.dist.rank), ("world_size", self.dist.world_size)):
            have = getattr(dataset, attr, expect)
            if have != expect:
                raise ValueError(f"dataset.{attr} is {have} but this process has {attr} {expect}: build the "
                                 f"dataset with rank={self.dist.rank}, world_size={self.dist.world_size}")
        self._startup_checks(unwrap_model(model))
        mode = run.distributed
        if mode == "auto":
            mode = "ddp" if self.dist.world_size > 1 else "none"
        if mode in ("ddp", "fsdp") and not self.dist.enabled:
            mode = "none"  # a single process needs no wrapper; the option still works under torchrun
        self.parallel = mode
        if self.device.type == "cuda" and run.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.raw_model = unwrap_model(model).to(self.device)
        self.fp8_report = None
        if run.precision == "fp8":  # before compile and wrapping: they see the FP8 modules
            from fastdit.modules.fp8 import enable_fp8
            self.fp8_report = enable_fp8(self.raw_model, run.fp8_recipe)
        if run.gradient_checkpointing:
            enable_gradient_checkpointing(self.raw_model)
        if run.compile:
            compile_blocks(self.raw_model)
            if self.parallel == "ddp":  # process-wide: read when dynamo first traces under DDP
                torch._dynamo.config.optimize_ddp = run.compile_ddp_split
        self.model = self._wrap(self.raw_model)

        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = self._build_optimizer()
        sch = config.schedule
        self.scheduler = build_scheduler(self.optimizer, kind=sch.kind, warmup_steps=sch.warmup_steps,
                                         total_steps=sch.total_steps or run.max_steps,
                                         min_lr_ratio=sch.min_lr_ratio)
        self.ema = EMA(self.model, config.ema.decay, config.ema.warmup) if config.ema.enabled else None
        self.autocast_dtype = torch.bfloat16 if run.precision in ("bf16", "fp8") else None

        self.run_dir = run.output_dir
        self.checkpoints = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), config.checkpoint.keep_last)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.resumed_from: Optional[str] = None
        self._finished = False
        self._log: Optional[JsonlLogger] = None
        self._tb = None
        self._bar = None
        self._prefetcher: Optional[Prefetcher] = None
        self._notes: List[str] = []  # resume warnings, logged once metrics.jsonl is open

    # ---- construction helpers -------------------------------------------------------------------
    def _startup_checks(self, model: nn.Module) -> None:
        """``check_output_dir`` on rank 0; every rank raises the same ``ConfigError`` (one all-gather, so no
        rank is left waiting in a later collective)."""
        problem = None
        if self.is_main:
            try:
                check_output_dir(self.config, model)
            except ConfigError as err:
                problem = str(err)
        problem = all_gather_objects(problem, self.dist)[0]
        if problem is not None:
            raise ConfigError(problem)

    def _wrap(self, raw: nn.Module) -> nn.Module:
        if self.parallel == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(raw, device_ids=ids)
        if self.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard
            # fully_shard does not synchronise weights (DDP does): make every rank start from rank 0's.
            with torch.no_grad():
                for t in list(raw.parameters()) + list(raw.buffers()):
                    dist.broadcast(t.data, 0)
            for block in model_blocks(raw):
                fully_shard(block)
            fully_shard(raw)
            return raw
        return raw

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        if o.weight_decay > 0:
            decay = [p for p in self.params if p.dim() >= 2]
            other = [p for p in self.params if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{"params": self.params, "weight_decay": 0.0}]
        impl = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **impl)

    # ---- public API ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def fit(self) -> Dict[str, Any]:
        """Train from the newest valid checkpoint (or from scratch) to ``run.max_steps``; returns a summary
        ``{"step", "skipped_steps", "loss", "resumed_from"}``. Raises ``CheckpointError`` (no valid checkpoint,
        or a damaged one named by ``checkpoint.resume``), ``ConfigError`` (a checkpoint of a different model
        or data) and ``CheckpointWriteError`` (a save that failed, e.g. a full disk) on every rank."""
        cfg = self.config
        start = self._resume_or_seed()
        self._open_logs(resumed_step=start if self.resumed_from else None)
        if self.is_main:
            for note in self._notes:
                self._log.write({"event": "warning", "step": start, "message": note})
            self._notes = []
            self._log.write({"event": "resume" if self.resumed_from else "start", "step": start,
                             "world_size": self.dist.world_size, "parallel": self.parallel,
                             "checkpoint": self.resumed_from,
                             **({"fp8": str(self.fp8_report)} if self.fp8_report is not None else {})})
        self._bar = self._progress_bar(start)
        flops, tokens = task_flops_per_sample(self.task), task_tokens_per_sample(self.task)
        if cfg.data.prefetch:
            self._prefetcher = Prefetcher(self.dataset, cfg.data.prefetch, pin_memory=self.device.type == "cuda",
                                          device=self.device)
            data = self._prefetcher
        else:
            data = iter(self.dataset)
        try:
            last_loss = self._loop(start, data, flops, tokens)
        finally:
            if self._prefetcher is not None:  # rewinds the dataset to the last batch used
                self._prefetcher.close()
                self._prefetcher = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._finished = True  # every rank got here: close() may synchronise before tearing the group down
        return {"step": self.step, "skipped_steps": self.skipped_steps, "loss": last_loss,
                "resumed_from": self.resumed_from}

    def _loop(self, start: int, data, flops, tokens) -> Optional[float]:
        """Steps ``start + 1 … run.max_steps`` with logging, samples and checkpoints; the last loss."""
        cfg = self.config
        interval = _Interval()
        last_loss = None
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        tick, paused = time.perf_counter(), 0.0
        peak = cfg.logging.peak_tflops if cfg.logging.peak_tflops is not None else known_peak_tflops(self.device)
        for step in range(start + 1, cfg.run.max_steps + 1):
            lr = self.optimizer.param_groups[0]["lr"]
            batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                     for k, v in next(data).items()}
            if step == start + 1:
                if self._needs_dispatch_warmup():
                    self._warm_up_dispatch(batch)
                self._agree_on_dispatch()  # before the first step traces (compile) or runs them
            loss, grad_norm, skipped = self._train_step(step, batch)
            self.step = step
            interval.add(loss, grad_norm, skipped)
            last_loss = loss
            if self._bar is not None:
                if step < cfg.run.max_steps:
                    self._bar.update(1)
                else:  # no redraw: closing the bar draws the final line (an update would draw it twice)
                    self._bar.n = step
            if step % cfg.logging.every == 0 or step == cfg.run.max_steps:
                # rates cover training only: time spent sampling and checkpointing is left out
                rates = throughput(steps=interval.steps, seconds=time.perf_counter() - tick - paused,
                                   batch_size=cfg.data.batch_size, world_size=self.dist.world_size,
                                   flops_per_sample=flops, tokens_per_sample=tokens,
                                   peak_tflops=peak)
                self._write_metrics(step, lr, interval, rates)
                interval = _Interval()
                tick, paused = time.perf_counter(), 0.0
            aside = time.perf_counter()
            if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                self.write_samples(step)
            every = cfg.checkpoint.every
            if (every and step % every == 0) or (step == cfg.run.max_steps and cfg.checkpoint.save_final):
                self.save_checkpoint(step)
            paused += time.perf_counter() - aside
        return last_loss

    def close(self) -> None:
        """Close the logs, and the process group if this trainer created it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        shutdown(self.dist, sync=self._finished)

    # ---- one step -------------------------------------------------------------------------------
    def _train_step(self, step: int, batch: Dict[str, Any]):
        """Forward, backward, agreed non-finite check, update of a batch on the device. Returns (mean loss
        over ranks or None, grad norm or None, skipped)."""
        loss = self._loss(batch)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise TypeError(f"task.loss must return a scalar tensor, got {type(loss).__name__} "
                            f"{tuple(getattr(loss, 'shape', ()))}")
        loss.backward()
        grad_norm = self._grad_norm()
        loss32 = loss.detach().float()
        bad = torch.logical_not(torch.isfinite(loss32) & torch.isfinite(grad_norm))
        # One collective carries every rank's flag (slot = rank) and loss (last slot, summed).
        world = self.dist.world_size
        stats = torch.zeros(world + 1, device=self.device, dtype=torch.float32)
        stats[self.dist.rank] = bad.float()
        stats[world] = loss32
        if self.dist.enabled:
            dist.all_reduce(stats)
        values = stats.tolist()  # the step's single host sync
        bad_ranks = [r for r in range(world) if values[r] != 0]
        if bad_ranks:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skips += 1
            limit = self.config.run.max_consecutive_skips
            if self.config.run.nonfinite == "error" or (limit and self.consecutive_skips > limit):
                why = ("run.nonfinite=error" if self.config.run.nonfinite == "error"
                       else f"more than run.max_consecutive_skips={limit} skipped steps in a row")
                if self._log is not None:
                    self._log.write({"event": "nonfinite_error", "step": step, "ranks": bad_ranks})
                raise NonFiniteError(f"step {step}: non-finite loss or gradient norm on rank(s) {bad_ranks} "
                                     f"({why}); model and optimizer are unchanged since step {step - 1}")
            if self.is_main:
                self._info(f"step {step}: non-finite loss or gradient norm on rank(s) {bad_ranks}; "
                           f"update skipped ({self.skipped_steps} skipped so far)")
            self.scheduler.step()
            return None, None, True
        self.consecutive_skips = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.scheduler.step()
        return values[world] / world, float(grad_norm), False

    def _needs_dispatch_warmup(self) -> bool:
        return self.config.run.compile and self.device.type == "cuda" and hasattr(torch.compiler, "set_stance")

    def _warm_up_dispatch(self, batch: Dict[str, Any]) -> None:
        """One eager forward (no grad) of the first batch, so that fastdit's ``"auto"`` ops measure their
        per-shape choices before torch.compile traces the blocks (a traced, unmeasured attention shape
        takes SDPA). Every RNG is restored afterwards: the run is the one it would be without this."""
        state = get_rng_state(self.device)
        try:
            with torch.compiler.set_stance("force_eager"), torch.no_grad():
                self._loss(batch)
        finally:
            set_rng_state(state, self.device)

    def _loss(self, batch: Dict[str, Any]) -> Any:
        """``task.loss`` of the training model under the run's autocast."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.task.loss(self.model, batch)

    def _agree_on_dispatch(self) -> None:
        """Every rank adopts rank 0's measured attention paths (``backend="auto"`` times them per process:
        ranks, and a resumed run, could otherwise pick differently). Collective; before the first step of
        a fit and before each checkpoint, which stores them for a resume."""
        set_attention_path_choices(all_gather_objects(attention_path_choices(), self.dist)[0])

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients (clipping them when ``optim.grad_clip > 0``), float32."""
        clip = self.config.optim.grad_clip
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("no parameter received a gradient: does task.loss call the model?")
        if clip > 0:
            norm = nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        elif hasattr(nn.utils, "get_total_norm"):
            norm = nn.utils.get_total_norm(grads, foreach=True)
        else:  # pragma: no cover - torch < 2.6
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        return norm.detach().float()

    # ---- samples ----------------------------------------------------------------------------------
    def write_samples(self, step: int) -> Optional[str]:
        """Call ``task.samples`` (all ranks; EMA weights, eval mode, no grad, RNG seeded with run.seed
        and restored after) and write the grid to ``samples/step_XXXXXXXXX.png`` on rank 0."""
        fn = getattr(self.task, "samples", None)
        if fn is None:
            return None
        saved = get_rng_state(self.device)
        was_training = self.raw_model.training
        self.raw_model.eval()
        try:
            seed_everything(self.config.run.seed)
            with (self.ema.swap() if self.ema is not None else contextlib.nullcontext()), torch.no_grad():
                images = fn(self.raw_model, step)
        finally:
            self.raw_model.train(was_training)
            set_rng_state(saved, self.device)
        if not self.is_main:
            return None
        path = os.path.join(self.run_dir, "samples", f"step_{step:09d}.png")
        save_image_grid(images, path, self.config.logging.sample_rows)
        if self._tb is not None:
            from fastdit.training.metrics import make_grid
            self._tb.add_image("samples", make_grid(images, self.config.logging.sample_rows), step,
                               dataformats="HWC")
        return path

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Optional[str]:
        """Save everything needed to continue after ``step`` (collective: every rank calls; rank 0
        writes). Returns the checkpoint folder on rank 0."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = clean_state_dict(get_model_state_dict(self.model, options=opts))
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        ema_sd = self.ema.state_dict() if self.ema is not None else None
        self._agree_on_dispatch()
        rngs = all_gather_objects(get_rng_state(self.device), self.dist)
        # the position after the last batch trained on (a prefetcher's dataset has drawn further)
        position = self._prefetcher.position if self._prefetcher is not None else self.dataset.state_dict()
        positions = all_gather_objects(position, self.dist)
        path, failure = None, None
        if self.is_main:
            state = {"format": 1, "step": step, "model": model_sd, "optimizer": optim_sd,
                     "scheduler": self.scheduler.state_dict(), "ema": ema_sd, "rng": rngs, "data": positions,
                     "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                     "attention_paths": attention_path_choices(),
                     "world_size": self.dist.world_size, "config": self.config.to_json()}
            exports = None
            if self.config.checkpoint.safetensors:
                exports = {"model": model_sd}
                if ema_sd is not None:
                    exports["ema"] = {**model_sd, **ema_sd["shadow"]}
            try:
                path = self.checkpoints.save(step, state, self.config.to_json(), exports)
            except Exception as err:  # every rank raises it below instead of waiting for rank 0
                failure = err
                if self._log is not None:
                    self._log.write({"event": "checkpoint_failed", "step": step, "error": str(err)})
            else:
                self._log.write({"event": "checkpoint", "step": step, "path": path})
        # one collective that is also the barrier: every rank learns whether rank 0's save failed
        report = None if failure is None else (isinstance(failure, CheckpointWriteError), str(failure))
        report = all_gather_objects(report, self.dist)[0]
        if failure is not None:
            raise failure
        if report is not None:
            raise (CheckpointWriteError if report[0] else RuntimeError)(
                f"checkpoint of step {step} failed on rank 0: {report[1]}")
        return path

    def _resume_or_seed(self) -> int:
        """Load the checkpoint ``checkpoint.resume`` selects (rank 0 decides, all ranks load it) and
        return its step; without one, seed every RNG with ``run.seed + rank`` and return 0."""
        cfg = self.config
        choice = None
        if self.is_main:
            self.checkpoints.remove_temporaries()
            resume = cfg.checkpoint.resume
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if resume == "auto":
                        choice = self.checkpoints.latest()
                    elif resume == "none":
                        if self.checkpoints.complete():
                            choice = RuntimeError(f"checkpoint.resume=none but {self.checkpoints.directory} already "
                                                  "has checkpoints; use resume=auto, a checkpoint path, or a new "
                                                  "run.output_dir")
                    else:
                        choice = resolve_checkpoint(resume)
            except Exception as err:  # FileNotFoundError, CheckpointError, ...: every rank raises it below
                choice = err
            for warning in caught:  # damaged checkpoints skipped: say so on the console and in the log
                self._info(f"warning: {warning.message}")
                self._notes.append(str(warning.message))
            if isinstance(choice, str):
                choice = self._check_compatible(choice)
        choice = all_gather_objects(choice, self.dist)[0]
        if isinstance(choice, Exception):
            raise choice
        if choice is None:
            seed_everything(cfg.run.seed + self.dist.rank)
            return 0
        self.load_checkpoint(choice)
        return self.step

    def load_checkpoint(self, path: str) -> None:
        """Restore model, optimizer, scheduler, EMA, counters, this rank's data position and RNG states
        from a checkpoint folder (every rank calls; each reads the file)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        state = load_state(path)
        stored = _stored_config(state.get("config"))
        problem = self._model_changes(path, stored)
        if problem:
            raise ConfigError(problem)
        if state["world_size"] != self.dist.world_size:
            raise RuntimeError(f"checkpoint {path} was written by {state['world_size']} ranks, this run has "
                               f"{self.dist.world_size}: exact resume needs the same world size (per-rank RNG "
                               "and data positions)")
        opts = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(self.model, clean_state_dict(state["model"]), options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, self._regroup_optimizer_state(state["optimizer"]),
                                 options=opts)
        self._apply_optimizer_config()
        self._restore_schedule(state["scheduler"])
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                warnings.warn(f"checkpoint {path} has no EMA; the EMA starts from the loaded weights")
                self.ema = EMA(self.model, self.config.ema.decay, self.config.ema.warmup)
        self.dataset.load_state_dict(state["data"][self.dist.rank])
        set_attention_path_choices(state.get("attention_paths", {}))
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.resumed_from = path
        if self.is_main and stored is not None:
            message = self._changes_message(path, stored)
            if message:
                self._info(message)
        set_rng_state(state["rng"][self.dist.rank], self.device)  # last: nothing may draw after this

    # ---- resume helpers ---------------------------------------------------------------------------
    def _check_compatible(self, path: str) -> Any:
        """``path``, or the ``ConfigError`` a resume from it would raise (read from its config.json, so
        rank 0 can refuse before any rank loads the state)."""
        try:
            with open(os.path.join(path, "config.json"), "r", encoding="utf-8") as fh:
                stored = _stored_config(fh.read())
        except OSError:
            return path  # load_checkpoint checks the copy inside state.pt
        problem = self._model_changes(path, stored)
        return ConfigError(problem) if problem else path

    def _model_changes(self, path: str, stored: Optional[Dict[str, Any]]) -> Optional[str]:
        """The refusal message when the checkpoint's config differs from this one in what defines the
        model and its data (``config.MODEL_DEFINING``), else None."""
        if stored is None:
            return None
        diffs = [(k, a, b) for k, a, b in config_changes(stored, self.config.to_dict()) if is_model_defining(k)]
        if not diffs:
            return None
        listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in diffs)
        return (f"cannot resume from {path}: it was trained with a different model or data ({listed}). A "
                "checkpoint only continues the run that wrote it: to train this configuration, use a new "
                "run.output_dir (--output-dir DIR); to continue the old run, put these settings back")

    def _changes_message(self, path: str, stored: Dict[str, Any]) -> Optional[str]:
        """'resuming ... with changed settings' with old -> new values and what was applied."""
        diffs = [(k, a, b) for k, a, b in config_changes(stored, self.config.to_dict())
                 if k != "checkpoint.resume"]
        if not diffs:
            return None
        listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in diffs)
        keys = [k for k, _, _ in diffs]
        optim = [k for k in keys if k in ("optim.lr", "optim.betas", "optim.eps", "optim.weight_decay")]
        sched = [k for k in keys if k.startswith("schedule.")] + (["run.max_steps"] if "run.max_steps" in keys
                                                                   and self.config.schedule.total_steps is None
                                                                   else [])
        kept = [k for k in keys if k in ("ema.decay", "ema.warmup")]
        parts = [f"resuming from {path} (step {self.step}) with changed settings: {listed}"]
        if optim:
            parts.append(f"applied to the loaded optimizer: {', '.join(optim)}")
        if optim or sched:
            lrs = ", ".join(f"{g['lr']:.6g}" for g in self.optimizer.param_groups)
            parts.append(f"LR schedule rebuilt from the new config at step {self.step}"
                         + (f" ({', '.join(sched)})" if sched else "") + f": next lr {lrs}")
        if kept:
            parts.append(f"not applied (the checkpoint's EMA settings are kept): {', '.join(kept)}")
        return "; ".join(parts)

    def _param_names(self) -> Dict[int, str]:
        names: Dict[int, str] = {}
        for name, p in self.raw_model.named_parameters():
            names.setdefault(id(p), clean_key(name))
        return names

    def _regroup_optimizer_state(self, saved: Dict[str, Any]) -> Dict[str, Any]:
        """The saved (FQN-keyed) optimizer state with its param groups replaced by this optimizer's: the
        same parameters by name, this config's hyperparameters, so a checkpoint whose grouping differs
        (weight decay turned on or off) still loads, and no old hyperparameter survives the load."""
        if not isinstance(saved, dict) or "state" not in saved or not all(
                isinstance(k, str) for k in saved["state"]):
            return saved  # not the FQN-keyed form get_optimizer_state_dict writes: load as it is
        names = self._param_names()
        groups = []
        for group in self.optimizer.param_groups:
            entry = {k: v for k, v in group.items() if k != "params"}
            entry["params"] = [names[id(p)] for p in group["params"]]
            groups.append(entry)
        return {"state": saved["state"], "param_groups": groups}

    def _apply_optimizer_config(self) -> None:
        """Write ``optim.lr``/``betas``/``eps``/``weight_decay`` into the param groups (the no-decay group
        of biases and norm scales keeps weight decay 0); the moment buffers are left as loaded."""
        o = self.config.optim
        decay_ids = {id(p) for p in self.params if p.dim() >= 2}
        for group in self.optimizer.param_groups:
            decays = o.weight_decay > 0 and any(id(p) in decay_ids for p in group["params"])
            group.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay if decays else 0.0,
                         initial_lr=o.lr)

    def _restore_schedule(self, saved: Dict[str, Any]) -> None:
        """Keep the checkpoint's step count, take the schedule and base LR from this config: the LR of the
        next step is ``optim.lr * factor(completed steps)`` of the new schedule."""
        completed = int(saved["last_epoch"])
        sch = self.scheduler
        state = dict(saved)
        state["base_lrs"] = [self.config.optim.lr] * len(self.optimizer.param_groups)
        state["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        lrs = [base * fn(completed) for base, fn in zip(state["base_lrs"], sch.lr_lambdas)]
        state["_last_lr"] = lrs
        sch.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    # ---- logging --------------------------------------------------------------------------------
    def _open_logs(self, resumed_step: Optional[int] = None) -> None:
        """Write config.json and open metrics.jsonl (and TensorBoard) on rank 0. After a resume from step
        ``resumed_step``, records of later steps (logged by the interrupted run after its last checkpoint,
        and run again now) are removed first, so every step appears once."""
        if not self.is_main or self._log is not None:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        tmp = os.path.join(self.run_dir, f".config.json.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.config.to_json())
        os.replace(tmp, os.path.join(self.run_dir, "config.json"))
        metrics = os.path.join(self.run_dir, "metrics.jsonl")
        if resumed_step is not None and os.path.exists(metrics):
            dropped = truncate_jsonl(metrics, resumed_step)
            if dropped:
                self._info(f"metrics.jsonl: removed {dropped} record(s) after step {resumed_step} (the resumed "
                           "steps are logged again)")
        self._log = JsonlLogger(metrics)
        if self.config.logging.tensorboard:
            self._tb = open_tensorboard(os.path.join(self.run_dir, "tb"),
                                        purge_step=None if resumed_step is None else resumed_step + 1)

    def _progress_bar(self, start: int):
        if not (self.is_main and self.config.logging.progress_bar):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.config.run.max_steps, initial=start, desc="train", dynamic_ncols=True,
                    file=sys.stderr)

    def _info(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def _data_skips(self) -> Optional[Dict[str, int]]:
        """Streaming data: samples skipped as bad (corrupt, failed fetch, ...) by reason, summed over every
        rank, up to the last batch trained on; None for data that skips nothing. Called by every rank (it
        gathers when the dataset counts skips, which every rank's dataset does or none does)."""
        if not callable(getattr(self.dataset, "skip_counts", None)):
            return None
        position = self._prefetcher.position if self._prefetcher is not None else self.dataset.state_dict()
        total: Dict[str, int] = {}
        for counts in all_gather_objects(skip_counts_of_state(position), self.dist):
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + int(n)
        return dict(sorted(total.items()))

    def _write_metrics(self, step: int, lr: float, interval: "_Interval", rates: Dict[str, float]) -> None:
        data_skips = self._data_skips()  # a collective: before the non-main ranks return
        if not self.is_main:
            return
        record: Dict[str, Any] = {"step": step, "loss": interval.mean_loss(), "grad_norm": interval.mean_norm(),
                                  "lr": lr, "skipped": interval.skipped, "skipped_steps": self.skipped_steps}
        record.update(rates)
        if data_skips is not None:
            record["data_skips"] = data_skips
        if self.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        self._log.write(record)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            post = {"loss": record["loss"], "lr": lr}
            if "images_per_s" in rates:
                post["img/s"] = rates["images_per_s"]
            if "mfu" in rates:
                post["mfu"] = rates["mfu"]
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in post.items()},
                                  refresh=False)


class _Interval:
    """Sums over one logging interval."""

    def __init__(self):
        self.steps, self.skipped = 0, 0
        self.losses: List[float] = []
        self.norms: List[float] = []

    def add(self, loss: Optional[float], norm: Optional[float], skipped: bool) -> None:
        self.steps += 1
        self.skipped += int(skipped)
        if loss is not None:
            self.losses.append(loss)
        if norm is not None:
            self.norms.append(norm)

    def mean_loss(self) -> Optional[float]:
        return sum(self.losses) / len(self.losses) if self.losses else None

    def mean_norm(self) -> Optional[float]:
        return sum(self.norms) / len(self.norms) if self.norms else None


def _stored_config(text: Any) -> Optional[Dict[str, Any]]:
    """A checkpoint's stored config as a nested dict (None when absent or unreadable: nothing to compare)."""
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _show(value: Any) -> str:
    """A config value in a message: strings quoted, lists/dicts as JSON, a missing key as (unset)."""
    if value is UNSET:
        return "(unset)"
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
