"""A scaling-law study, the driver: prepare the grid (data and every point), plan it, train what is not done
yet through :class:`fastdit.training.Trainer` (resuming), fit, and write ``scaling.json`` and ``scaling.png``.

    cfg = ScalingConfig(out_dir="scaling", sizes=parse_sizes("32x2,64x3,128x4,192x4"),
                        budgets=parse_budgets("100,200,400,800"))
    study = Study.prepare(cfg)          # data (digits latents, cached in out_dir/data) and the plan
    print("\\n".join(study.plan_lines(study.estimate())))
    report = study.run()                # trains what is not done yet, fits, writes scaling.json / scaling.png

Sizes: ``HxD`` (hidden size × depth; heads = H / 32, at least 1), ``HxDxN`` (N heads), or a DiT preset name
(``DiT-S/2``); any of them with ``:lr=VALUE`` for a learning rate of its own. Budgets: optimizer steps.
Every point is its own run (its own warm-up and cosine schedule to its budget: the Chinchilla protocol)
in ``out_dir/points/<size>_s<steps>/`` and its result is ``result.json`` there, written atomically when the
point is done; a later invocation skips points whose result exists (and refuses one whose recorded settings
differ from the current ones), and a point interrupted mid-way resumes from its latest trainer checkpoint: the
final one (interrupted before its evaluation), or with ``checkpoint_every`` (``--checkpoint-every``; a
configured study: its ``checkpoint.every``) one saved on the way; the digits data save only the final one by
default, so a point cut short in training starts again.

Data: by default the digits demo's latents (:mod:`fastdit.demos.digits`): its autoencoder is trained once
and cached with the training and held-out latents in ``out_dir/data``; or any ``fastdit train`` config
(``base_config``) with a held-out tensor file. Per point: the EMA weights' loss on the held-out latents
(fixed noise and times from ``eval_seed``, so points are comparable), for digits the Fréchet distance
(and precision / recall) of decoded samples against the held-out real digits in the feature space of
:class:`fastdit.metrics.DigitFeatures`, training FLOPs (the model's FLOP counter × global batch × steps),
wall time and status (``ok``, or ``diverged``: a non-finite loss or gradient norm, recorded and left out of
the fits).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from fastdit.scaling.data import EvalData, digits_plan_config, prepare_configured, prepare_digits
from fastdit.scaling.evaluate import real_reference, sample_quality
from fastdit.scaling.files import DATA_DIR, PLOT_FILE, REPORT_FILE, write_json_atomic
from fastdit.scaling.plan import estimate_wall_time, plan_lines
from fastdit.scaling.point import (GridPoint, load_point_result, model_cost, point_config, point_result_path,
                                   train_and_evaluate)
from fastdit.scaling.spec import GridError, ScalingConfig
from fastdit.training.config import TrainConfig


@contextlib.contextmanager
def _threads(n: Optional[int]) -> Iterator[None]:
    """torch CPU threads set to ``n`` inside the block (restored after); nothing when ``n`` is None."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Study:
    """A prepared grid (see the module docstring): :meth:`prepare`, :meth:`estimate`, :meth:`plan_lines`,
    :meth:`run`."""

    def __init__(self, cfg: ScalingConfig, base: Optional[TrainConfig], evald: Optional[EvalData],
                 data_info: Dict[str, Any], points: List[GridPoint], device: torch.device):
        self.cfg, self.base, self.evald, self.data_info = cfg, base, evald, data_info
        self.points, self.device = points, device
        self.notes: List[str] = []
        self._features = None

    @property
    def digits(self) -> bool:
        return self.cfg.base_config is None

    @classmethod
    def prepare(cls, cfg: ScalingConfig, train_data: bool = True) -> "Study":
        """Check the grid, prepare the data (digits: trains and caches the autoencoder unless
        ``train_data`` is False and no cache exists — then the plan is made from the demo's config alone)
        and make every point's config, parameters and FLOPs."""
        from fastdit.backend import pick_device

        cfg.check()
        try:
            device = pick_device(cfg.device)
        except ValueError as err:
            raise GridError(str(err)) from None
        if cfg.threads is None and device.type == "cpu":
            # tiny models gain little from intra-op threads, and on a busy machine several threads spin against
            # each other: measured 10-100x slower steps on a shared 2-core CPU (--threads N to choose)
            cfg.threads = 1
        with _threads(cfg.threads):
            if cfg.base_config is None:
                base, evald, info = prepare_digits(cfg, device, train=train_data)
                if base is None:  # dry run without a cache: the config the demo would make (latents 4x4x4)
                    base = digits_plan_config(cfg, device)
            else:
                base, evald, info = prepare_configured(cfg, device)
        if cfg.precision is not None:
            base.run.precision = cfg.precision
        if cfg.checkpoint_every is not None:
            base.checkpoint.every = cfg.checkpoint_every
        points = []
        for size in cfg.sizes:
            for steps in cfg.budgets:
                config = point_config(base, size, steps, cfg.out_dir, digits_warmup=cfg.base_config is None)
                params, flops = model_cost(config)
                points.append(GridPoint(size, steps, config, params, flops, config.data.batch_size))
        return cls(cfg, base, evald, info, points, device)

    def threads(self) -> contextlib.AbstractContextManager:
        """The study's torch CPU thread setting (``cfg.threads``) for the duration of a ``with`` block."""
        return _threads(self.cfg.threads)

    # ---- resume ------------------------------------------------------------------------------------
    def eval_spec(self) -> Dict[str, Any]:
        c = self.cfg
        spec = {"seed": c.eval_seed, "repeats": c.eval_repeats, "held_out": self.data_info.get("held_out")}
        if self.digits and c.fd:
            spec.update(fd_samples=self.fd_count(), sample_steps=c.sample_steps, cfg_scale=c.cfg_scale)
        return spec

    def fd_count(self) -> int:
        """How many samples FD is measured on: ``fd_samples``, at most the held-out digits."""
        held = self.data_info.get("held_out")
        n = held if isinstance(held, int) else 0
        return min(self.cfg.fd_samples or n, n) if n else (self.cfg.fd_samples or 0)

    def result_path(self, point: GridPoint) -> str:
        return point_result_path(point)

    def load_result(self, point: GridPoint) -> Optional[Dict[str, Any]]:
        """The recorded result of ``point``, None when it has none; GridError when it was made with other
        settings (the folder belongs to another grid)."""
        return load_point_result(point, self.eval_spec(), self.cfg.out_dir)

    # ---- estimate and plan (fastdit.scaling.plan) --------------------------------------------------
    def estimate(self, measure_steps: int = 2) -> Dict[str, Any]:
        """Seconds per step of each size and the wall time of the points not done yet
        (:func:`fastdit.scaling.plan.estimate_wall_time`)."""
        return estimate_wall_time(self, measure_steps)

    def plan_lines(self, estimate: Optional[Dict[str, Any]] = None) -> List[str]:
        """The grid as a table (size, params, budget, training FLOPs, done or not) and the wall-time estimate."""
        return plan_lines(self, estimate)

    # ---- running -----------------------------------------------------------------------------------
    def _digit_features(self):
        if self._features is None:
            from fastdit.metrics import DigitFeatures

            self._features = DigitFeatures.fit(self.evald.train_images, self.evald.train_labels, seed=self.cfg.seed,
                                               cache_dir=os.path.join(self.cfg.out_dir, DATA_DIR))
        return self._features

    def run_point(self, point: GridPoint) -> Dict[str, Any]:
        """Train one point (resuming its trainer checkpoint if any), evaluate it, write its result.json
        atomically and return the result (:func:`fastdit.scaling.point.train_and_evaluate`)."""
        quality = self._quality if self.digits and self.cfg.fd else None
        return train_and_evaluate(point, self.cfg, self.evald, self.eval_spec(), quality)

    def _quality(self, model, built, device) -> Dict[str, Any]:
        try:
            features = self._digit_features()
        except ImportError as err:
            return {"fd": None, "fd_note": f"fastdit.metrics is not available ({err})"}
        return sample_quality(features, model, built.objective, built.latent_space, self.evald, self.fd_count(),
                              self.cfg.sample_steps, self.cfg.cfg_scale, self.cfg.eval_seed, device)

    def run(self) -> Dict[str, Any]:
        """Train every point not done yet (tqdm bar over their steps), then fit and write ``scaling.json`` and
        ``scaling.png``; returns the report (see :meth:`write_report`)."""
        from tqdm.auto import tqdm

        results: Dict[str, Dict[str, Any]] = {}
        pending = []
        for p in self.points:
            done = self.load_result(p)
            if done is None:
                pending.append(p)
            else:
                results[p.key] = done
        started = time.perf_counter()
        with self.threads():
            if pending and self.digits and self.cfg.fd:
                try:  # trained (or loaded from data/) once, before the first point's clock starts
                    self._digit_features()
                except ImportError:
                    pass  # each point records it (fd_note) and the report's notes say so
            bar = tqdm(total=sum(p.steps for p in pending), unit="step", desc="grid", dynamic_ncols=True,
                       disable=not self.cfg.progress or not pending)
            try:
                for p in pending:
                    bar.set_postfix_str(f"{p.size.label} {p.steps} steps", refresh=True)
                    result = self.run_point(p)
                    results[p.key] = result
                    bar.update(p.steps)
                    if result["status"] != "ok":
                        bar.write(f"{p.key}: {result['status']} ({result.get('reason', '')})")
            finally:
                bar.close()
        return self.write_report([results[p.key] for p in self.points], trained=[p.key for p in pending],
                                 seconds=time.perf_counter() - started)

    def fd_real_reference(self) -> Optional[Dict[str, Any]]:
        """The yardstick of the FD figures: FD (and precision / recall) of as many *real training* digits as
        FD samples, with the same class counts (drawn with ``eval_seed``), against the held-out digits -- what
        a perfect model would score at this sample count. None without digits, FD or fastdit.metrics."""
        if not (self.digits and self.cfg.fd and self.evald is not None):
            return None
        try:
            features = self._digit_features()
        except ImportError:
            return None
        return real_reference(features, self.evald, self.fd_count(), self.cfg.eval_seed)

    def write_report(self, results: List[Dict[str, Any]], trained: Sequence[str], seconds: float) -> Dict[str, Any]:
        """Fit (:func:`fastdit.scaling.fit.fit_grid`), then write ``scaling.json`` (grid, every point, fits,
        excluded points, notes) atomically and ``scaling.png``; returns the report."""
        from fastdit.scaling.fit import fit_grid
        from fastdit.scaling.plot import plot_study

        c = self.cfg
        fits = fit_grid(results, confidence=c.confidence)
        notes = list(self.notes) + [f"{e['key']}: {e['status']} -- {e['reason']}; left out of the fits"
                                    for e in fits["excluded"]]
        if not self.digits:
            notes.append("FD is measured on the digits data only (it needs a feature space for the data): this "
                         "configured study reports the held-out loss")
        if self.digits and c.fd and any(r.get("fd") is None for r in results if r.get("status") == "ok"):
            notes.append("FD missing for some points: " + "; ".join(sorted({r.get("fd_note", "") for r in results
                                                                             if r.get("status") == "ok"
                                                                             and r.get("fd") is None})))
        report = {
            "study": "fastdit scaling",
            "format": 1,
            "grid": {
                "sizes": [{"label": s.label, "key": s.key, "preset": s.preset, "options": s.model_options(),
                           "params": next(p.params for p in self.points if p.size == s),
                           "flops_per_sample": next(p.flops_per_sample for p in self.points if p.size == s),
                           "lr": next(p.config.optim.lr for p in self.points if p.size == s)} for s in c.sizes],
                "budgets_steps": list(c.budgets),
                "global_batch": self.points[0].global_batch,
                "model": self.base.model.name, "model_options": self.base.model.options,
                "task": self.base.task.name or "rectified_flow",
                "device": str(self.device), "threads": c.threads, "confidence": c.confidence,
                "data": self.data_info,
                "evaluation": {**self.eval_spec(), "held_out_description":
                               self.evald.description if self.evald else None,
                               "loss": "EMA weights, mean diffusion loss over the held-out latents, fixed (noise, t) "
                                       "draws from the evaluation seed",
                               "fd": ("Frechet distance of decoded samples (labels of the held-out digits, Euler, "
                                      "guided) against the held-out real digits in fastdit.metrics.DigitFeatures "
                                      "space; precision/recall with k=3") if self.digits and c.fd else None,
                               "fd_real_reference": self.fd_real_reference()},
                "compute": "training FLOPs = flops_per_sample(training=True) x global batch x steps "
                           "(fastdit.models FLOP counter: 3 x forward matmul FLOPs)",
            },
            "points": results,
            "fits": {k: v for k, v in fits.items() if k != "excluded"},
            "excluded": fits["excluded"],
            "notes": notes,
            "trained_now": list(trained),
            "seconds_this_invocation": seconds,
            "environment": _environment(self.device),
            "files": {"report": os.path.abspath(os.path.join(c.out_dir, REPORT_FILE)),
                      "plot": os.path.abspath(os.path.join(c.out_dir, PLOT_FILE))},
        }
        plot_study(report, report["files"]["plot"])
        write_json_atomic(report["files"]["report"], report)
        return report


def _environment(device) -> Dict[str, Any]:
    """Where the study ran: versions, the device (GPU name or CPU model), date and the git commit of the
    working tree when there is one (what a results folder records)."""
    import datetime
    import platform
    import subprocess

    import fastdit

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if torch.device(device).type == "cuda":
        hardware = torch.cuda.get_device_name(torch.device(device))
    else:
        hardware = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                hardware = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                hardware)
        except OSError:
            pass
        hardware = f"{hardware}, {os.cpu_count()} logical CPUs"
    return {"device": str(device), "hardware": hardware, "torch": torch.__version__, "python": platform.python_version(),
            "fastdit": fastdit.__version__, "git_commit": commit, "date": datetime.date.today().isoformat()}
