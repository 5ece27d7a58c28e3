"""The grid specification of a scaling study: model sizes (``HxD``, ``HxDxN``, a DiT preset, each with an
optional ``:lr=VALUE``), training budgets in optimizer steps, and the study's settings (:class:`ScalingConfig`),
parsed and checked; :class:`GridError` for anything wrong."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional

from fastdit.training.config import TrainConfig

HEAD_DIM = 32                       # heads of an HxD size: H / HEAD_DIM (at least 1)
# the default grid: 1.8 decades of parameters (50 k .. 3.0 M), budgets doubling; ~15 min on a 2-core CPU
DEFAULT_SIZES = "32x2,64x3,128x4,192x4"
DEFAULT_BUDGETS = "100,200,400,800"


class GridError(ValueError):
    """A bad grid specification or an output folder that holds another grid; the message says which."""


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """One model size of the grid: a DiT preset (``preset``) or hidden size × depth (× heads), with an
    optional learning rate of its own."""
    label: str                       # as given, e.g. "64x3" or "DiT-S/2" or "64x3:lr=3e-3"
    preset: Optional[str] = None
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    lr: Optional[float] = None

    @property
    def key(self) -> str:
        """A folder-safe name: ``h64-d3``, ``DiT-S-2``, ``h64-d3-lr0.003``."""
        base = (re.sub(r"[^A-Za-z0-9.+-]", "-", self.preset) if self.preset
                else f"h{self.hidden_size}-d{self.depth}" + (f"-n{self.num_heads}" if self._explicit_heads else ""))
        return base + (f"-lr{self.lr:g}" if self.lr is not None else "")

    @property
    def _explicit_heads(self) -> bool:
        return self.num_heads is not None and self.num_heads != max(1, (self.hidden_size or 0) // HEAD_DIM)

    def model_options(self) -> Dict[str, int]:
        if self.preset:
            return {}
        return {"hidden_size": self.hidden_size, "depth": self.depth, "num_heads": self.num_heads}


_SIZE_RE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


def parse_size(text: str) -> ModelSize:
    """``HxD``, ``HxDxN`` or a DiT preset name, optionally ``:lr=VALUE``; GridError otherwise."""
    from fastdit.models import DiTConfig, model_names

    label = text.strip()
    spec, _, extra = label.partition(":")
    lr = None
    if extra:
        key, eq, value = extra.partition("=")
        if key.strip() != "lr" or not eq:
            raise GridError(f"size {label!r}: the only per-size option is :lr=VALUE")
        try:
            lr = float(value)
        except ValueError:
            raise GridError(f"size {label!r}: lr {value!r} is not a number") from None
        if not (lr > 0 and math.isfinite(lr)):
            raise GridError(f"size {label!r}: lr must be a positive finite number")
    spec = spec.strip()
    m = _SIZE_RE.match(spec)
    if m:
        hidden, depth = int(m.group(1)), int(m.group(2))
        heads = int(m.group(3)) if m.group(3) else max(1, hidden // HEAD_DIM)
        if hidden < 4 or depth < 1 or heads < 1:
            raise GridError(f"size {label!r}: hidden size must be >= 4, depth and heads >= 1")
        if hidden % 4 or hidden % heads:
            raise GridError(f"size {label!r}: the hidden size must be divisible by 4 (2-D positions) and by the "
                            f"number of heads ({heads})")
        return ModelSize(label, hidden_size=hidden, depth=depth, num_heads=heads, lr=lr)
    if spec in DiTConfig.PRESETS:
        return ModelSize(label, preset=spec, lr=lr)
    if spec in model_names():
        raise GridError(f"size {label!r}: the scaling study trains class-conditional DiTs; {spec} is an MMDiT")
    raise GridError(f"size {label!r} is not HxD (hidden x depth, e.g. 64x3), HxDxN (with N heads) or a DiT preset "
                    f"({', '.join(DiTConfig.PRESETS)})")


def parse_sizes(text: str) -> List[ModelSize]:
    """Comma-separated sizes (see :func:`parse_size`); GridError for none, a bad one or a repeated one."""
    items = [t for t in (text or "").split(",") if t.strip()]
    if not items:
        raise GridError("no model sizes given (e.g. --sizes 32x2,64x3,128x4)")
    sizes = [parse_size(t) for t in items]
    keys = [s.key for s in sizes]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise GridError(f"model size(s) given twice: {', '.join(dup)}")
    return sizes


def parse_budgets(text: str) -> List[int]:
    """Comma-separated training budgets in optimizer steps (positive ints, no repeats), sorted."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise GridError("no training budgets given (e.g. --steps 100,200,400)")
    out = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise GridError(f"budget {item!r} is not a number of steps") from None
        if not value.is_integer() or value < 1:
            raise GridError(f"budget {item!r}: steps must be a positive whole number")
        out.append(int(value))
    if len(set(out)) != len(out):
        twice = sorted({v for v in out if out.count(v) > 1})
        raise GridError(f"budget(s) given twice: {', '.join(str(v) for v in twice)}")
    return sorted(out)


@dataclasses.dataclass
class ScalingConfig:
    """Settings of a study. With ``base_config`` None the data are the digits demo's latents; else that
    ``TrainConfig`` (as ``fastdit train`` reads it) gives data, task and trainer settings, and
    ``held_out`` a tensor file (``"x"``, ``"y"``) to measure the loss on (synthetic data: drawn from
    another seed when not given)."""
    out_dir: str = "fastdit-scaling"
    sizes: List[ModelSize] = dataclasses.field(default_factory=lambda: parse_sizes(DEFAULT_SIZES))
    budgets: List[int] = dataclasses.field(default_factory=lambda: parse_budgets(DEFAULT_BUDGETS))
    batch_size: Optional[int] = None     # None: 64 (digits) or the config's data.batch_size
    lr: Optional[float] = None           # None: 1e-3 (digits) or the config's optim.lr; a size's :lr wins
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None        # torch CPU threads while the study runs (None: 1 on the CPU, see prepare)
    base_config: Optional[TrainConfig] = None
    held_out: Optional[str] = None
    # digits data
    ae_steps: int = 800
    # evaluation
    eval_seed: int = 1234
    eval_repeats: int = 4                # (noise, t) draws per held-out latent
    eval_samples: int = 512              # held-out latents used (configured data)
    fd_samples: Optional[int] = None     # samples for FD (None: as many as held-out digits)
    sample_steps: int = 20
    cfg_scale: float = 1.5
    fd: bool = True
    confidence: float = 0.95
    progress: bool = True
    precision: Optional[str] = None      # None: the data's default (digits: bf16 on CUDA, fp32 on the CPU)
    checkpoint_every: Optional[int] = None  # None: the base config's (digits: 0, the final checkpoint only)

    def check(self) -> "ScalingConfig":
        if not self.sizes or not self.budgets:
            raise GridError("the grid needs at least one model size and one budget")
        for name in ("batch_size", "threads", "fd_samples", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GridError(f"{name} must be >= 1, got {value}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise GridError(f"lr must be a positive finite number, got {self.lr}")
        for name in ("ae_steps", "eval_repeats", "eval_samples", "sample_steps"):
            if getattr(self, name) < 1:
                raise GridError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg_scale < 0:
            raise GridError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if not 0 < self.confidence < 1:
            raise GridError(f"confidence must be in (0, 1), got {self.confidence}")
        return self

