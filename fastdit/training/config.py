"""Typed trainer configuration: dataclass sections, JSON files, dotted command-line overrides.

A config is a ``TrainConfig`` of sections (``run``, ``model``, ``task``, ``data``, ``optim``,
``schedule``, ``ema``, ``checkpoint``, ``logging``). It loads from a JSON object of the same shape, any
subset of keys (the rest keep their defaults), then ``section.key=value`` overrides apply on top:

    cfg = TrainConfig.from_json("run.json", overrides=["optim.lr=1e-4", "run.precision=fp32",
                                                       "model.options.depth=12"])

Values of typed fields are parsed from their annotation (bool accepts true/false/1/0/yes/no/on/off;
tuples accept ``0.9,0.95`` or JSON ``[0.9, 0.95]``; Optional fields accept ``none``/``null``); free-form
``options`` dicts take JSON values (a bare word stays a string). Unknown sections or keys, unparsable
values and values out of range raise ``ConfigError`` naming the dotted key (with a close match when
there is one). ``to_json`` writes the whole config; checkpoints store it that way (never pickled).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple


class ConfigError(ValueError):
    """A configuration key, value or file is invalid (the message names the dotted key)."""


@dataclass
class RunConfig:
    """Where and how the run executes.

    output_dir: run folder (checkpoints/, samples/, metrics.jsonl, tb/, config.json). Required (there
        is no default, so two runs never share one by accident): the ``Trainer`` refuses an empty one with
        ``ConfigError``. A run whose folder already holds checkpoints resumes from them
        (``checkpoint.resume=auto``), so the same ``output_dir`` means the same run.
    max_steps: optimizer steps to train for (the loop counts steps, not epochs); a resumed run
        continues until the same total.
    seed: base seed; rank r seeds python/numpy/torch with ``seed + r``.
    device: ``auto`` (cuda:LOCAL_RANK when CUDA is available, else cpu), ``cpu`` or ``cuda``.
    distributed: ``auto`` (DDP when WORLD_SIZE > 1), ``none``, ``ddp`` or ``fsdp`` (FSDP2
        ``fully_shard`` per element of ``model.blocks``, then the root).
    precision: ``bf16`` (autocast to bfloat16, fp32 weights), ``fp32``, or ``fp8``: bf16 autocast with the
        Linear layers of the DiT / MMDiT blocks as FP8 GEMMs (:func:`fastdit.modules.fp8.enable_fp8`; master
        weights, optimizer and residual stream as in bf16).
    fp8_recipe: with ``precision=fp8``, the recipe (``rowwise``, ``rowwise_hp_wgrad`` or ``tensorwise``; see
        :mod:`fastdit.ops.fp8_linear`).
    compile: ``torch.compile`` each element of ``model.blocks`` with ``fullgraph=True`` (in place, so
        parameter names do not change).
    compile_ddp_split: with compile under DDP, let dynamo's DDPOptimizer split each compiled block at
        gradient-bucket boundaries (``torch._dynamo.config.optimize_ddp``), so all-reduce can start inside a
        block's backward. Off by default: per-block compile already lets buckets overlap block by block,
        and keeping each block one graph (the kernels a single-GPU run executes) measured faster — DiT-B/2
        on 2× H200, 2 runs: 90.1% / 91.6% scaling efficiency unsplit, 87.5% / 86.5% split.
    gradient_checkpointing: recompute each block's activations in backward.
    nonfinite: what all ranks do when the loss or grad norm is NaN/inf on any rank: ``skip`` the
        optimizer step (counted, logged) or ``error`` (every rank raises ``NonFiniteError``).
    max_consecutive_skips: ``skip`` turns into an error after this many skipped steps in a row
        (0 = never).
    tf32: allow TF32 matmuls/convolutions on CUDA (fp32 parts of the step run on tensor cores).
    dist_timeout_s: timeout of collectives; a peer that died makes the others fail after this long.
    """
    output_dir: str = ""
    max_steps: int = 1000
    seed: int = 0
    device: str = "auto"
    distributed: str = "auto"
    precision: str = "bf16"
    fp8_recipe: str = "rowwise"
    compile: bool = False
    compile_ddp_split: bool = False
    gradient_checkpointing: bool = False
    nonfinite: str = "skip"
    max_consecutive_skips: int = 100
    tf32: bool = True
    dist_timeout_s: float = 600.0


@dataclass
class ModelConfig:
    """Which model the entry point builds (the trainer itself receives a built module).

    name: a preset name of the model registry (e.g. ``"DiT-XL/2"``).
    options: keyword arguments for the model constructor (JSON values).
    """
    name: str = ""
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """Which training objective the entry point builds (e.g. rectified flow), with its options."""
    name: str = ""
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """The data source.

    batch_size: samples per rank per step (global batch = batch_size * world size).
    kind: which dataset the entry point builds (``synthetic``, ``memory``, or a streaming loader's name).
    path: where the data lives (kind-specific; empty for synthetic).
    latent_shape: (C, H, W) of the latents (synthetic data; also what samplers produce).
    num_classes: labels are in ``[0, num_classes)``; 0 = unconditional.
    options: further kind-specific settings (JSON values).
    prefetch: batches drawn ahead in a background thread (pinned on CUDA), so that making a batch
        overlaps the GPU's work; 0 draws each batch in the training loop. Resume stays exact either way.
    """
    batch_size: int = 32
    kind: str = "synthetic"
    path: str = ""
    latent_shape: Tuple[int, int, int] = (4, 32, 32)
    num_classes: int = 1000
    options: Dict[str, Any] = field(default_factory=dict)
    prefetch: int = 2


@dataclass
class OptimConfig:
    """AdamW (fused on CUDA, foreach on CPU).

    weight_decay applies to parameters with 2 or more dimensions only (not to biases and norm scales).
    grad_clip: max global gradient norm; 0 disables clipping (the norm is still computed and logged).
    """
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """Learning rate: linear warm-up (``lr * step / warmup_steps`` for steps 1..warmup_steps), then
    ``constant`` or ``cosine`` decay to ``min_lr_ratio * lr`` at ``total_steps`` (default
    ``run.max_steps``)."""
    kind: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: Optional[int] = None


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (fp32 shadow, used for sampling and export).

    decay: the target decay; with ``warmup`` the decay of update n (0-based) is
        ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the random init.
    """
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True


@dataclass
class CheckpointConfig:
    """Checkpoints in ``<output_dir>/checkpoints``.

    every: save every this many steps (0 = only the final one when ``save_final``).
    keep_last: complete checkpoints kept (older ones are deleted; the newest never is).
    resume: ``auto`` (the newest *valid* checkpoint of output_dir if any: a damaged newer one is skipped
        with a warning naming it and why), ``none`` (start fresh; refuses to run when checkpoints exist,
        so they are not overwritten by accident) or a checkpoint folder (validated: a damaged one is an
        error, never silently replaced by another).
    safetensors: also export the weights as ``model.safetensors`` and ``ema.safetensors`` in each
        checkpoint (for tools that read safetensors). Off by default: ``state.pt`` already holds the model
        and the EMA, so the export adds one more copy of the model's weights (parameters and buffers at
        their training dtype, e.g. 4 bytes per fp32 parameter) plus, with ``ema.enabled``, one of the EMA's
        (fp32) to every checkpoint. ``fastdit.training.load_weights`` reads ``state.pt`` when there is no
        export.
    save_final: save when ``max_steps`` is reached.

    On resume, the checkpoint restores the model, the EMA, the optimizer's moment buffers, the counters,
    the data position and the RNG states; the *new* config decides everything else. In particular the
    optimizer hyperparameters (``optim.lr``, ``betas``, ``eps``, ``weight_decay``) are written into the
    loaded optimizer and the LR schedule is rebuilt from ``schedule.*`` at the checkpoint's step (see
    ``TrainConfig``). Settings that define the model or the data it sees (``model.*``,
    ``data.latent_shape``, ``data.num_classes``, ``task.name``) must match the checkpoint's: a resume that
    changes them is refused with ``ConfigError``.
    """
    every: int = 1000
    keep_last: int = 3
    resume: str = "auto"
    safetensors: bool = False
    save_final: bool = True


@dataclass
class LoggingConfig:
    """Metrics and samples.

    every: log metrics (a JSONL record: mean loss and grad norm over the interval, rates, peak memory)
        every this many steps; 1 gives per-step losses.
    sample_every: write a sample grid PNG every this many steps (0 = never; needs ``task.samples``).
    sample_rows: rows of the sample grid.
    tensorboard: also write TensorBoard events when ``tensorboard`` is installed.
    progress_bar: tqdm bar on rank 0's console.
    peak_tflops: peak dense TFLOP/s of one device for MFU. ``None`` (default): known for an NVIDIA H100 or
        H200 (989, bf16 dense); on any other device (CPU included) MFU is not computed and the metrics have
        no ``mfu`` key. Set it to get MFU elsewhere.
    """
    every: int = 10
    sample_every: int = 0
    sample_rows: int = 4
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: Optional[float] = None


_CHOICES = {
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("run", "distributed"): ("auto", "none", "ddp", "fsdp"),
    ("run", "precision"): ("bf16", "fp32", "fp8"),
    ("run", "fp8_recipe"): ("rowwise", "rowwise_hp_wgrad", "tensorwise"),
    ("run", "nonfinite"): ("skip", "error"),
    ("schedule", "kind"): ("constant", "cosine"),
}


@dataclass
class TrainConfig:
    """The whole trainer configuration (see the module docstring and each section's docstring).

    Resuming with a changed config: the new config wins for everything the checkpoint does not pin down.
    Optimizer hyperparameters (``optim.lr``, ``optim.betas``, ``optim.eps``, ``optim.weight_decay``; the
    no-decay group of biases and norm scales stays at 0) are written into the loaded optimizer's param
    groups, and the LR schedule (``schedule.kind``, ``warmup_steps``, ``total_steps``, ``min_lr_ratio``)
    is rebuilt from the new config while keeping the checkpoint's step count, so the LR of step ``k`` is
    ``new optim.lr * new factor(k)``; AdamW's moment buffers (``exp_avg``, ``exp_avg_sq``, ``step``) are
    kept. The EMA keeps the checkpoint's ``decay`` and ``warmup``. The fields that define the model and the
    data the model sees (the whole ``model`` section, ``data.latent_shape``, ``data.num_classes``,
    ``task.name``) cannot change on resume: the trainer refuses with ``ConfigError`` naming each field
    (see ``MODEL_DEFINING``).
    """
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Dict[str, Any], overrides: Sequence[str] = ()) -> "TrainConfig":
        """Build from a (possibly partial) nested dict, apply ``key=value`` overrides, validate."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        cfg = cls()
        for section, values in data.items():
            sec = _section(cfg, section)
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected an object of settings, got {values!r}")
            for key, value in values.items():
                _field(sec, section, key)
                setattr(sec, key, _coerce(value, _hint(sec, key), f"{section}.{key}", from_text=False))
        for item in overrides:
            cfg.apply_override(item, validate=False)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: Optional[str] = None, overrides: Sequence[str] = ()) -> "TrainConfig":
        """Load a JSON file (``None``: defaults only), then apply overrides."""
        data: Dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "r", encoding="utf-8") as fh:
                    data = json.load(fh)
            except OSError as err:
                raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
            except json.JSONDecodeError as err:
                raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
        return cls.from_dict(data, overrides)

    @classmethod
    def from_json_string(cls, text: str) -> "TrainConfig":
        """Parse what ``to_json`` wrote (e.g. the copy stored in a checkpoint)."""
        return cls.from_dict(json.loads(text))

    def apply_override(self, item: str, validate: bool = True) -> None:
        """Apply one ``section.key=value`` (or ``section.options.name=value``) override in place."""
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: the key must be dotted, e.g. optim.lr=1e-4")
        sec = _section(self, parts[0])
        _field(sec, parts[0], parts[1])
        if len(parts) == 2:
            setattr(sec, parts[1], _coerce(text, _hint(sec, parts[1]), path, from_text=True))
        else:
            target = getattr(sec, parts[1])
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {parts[0]}.{parts[1]} has no sub-keys")
            for name in parts[2:-1]:
                target = target.setdefault(name, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"override {item!r}: {name} is not an object")
            target[parts[-1]] = _parse_json_value(text)
        if validate:
            self.validate()

    # ---- output -------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (tuples become lists), JSON-serialisable."""
        return json.loads(self.to_json())

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent, sort_keys=False)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ConfigError`` for the first value out of its range or choices."""
        for (section, key), choices in _CHOICES.items():
            value = getattr(getattr(self, section), key)
            if value not in choices:
                raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}; got {value!r}")
        r, o, s, c, lg, d = self.run, self.optim, self.schedule, self.checkpoint, self.logging, self.data
        checks = [
            ("run.max_steps", r.max_steps >= 1, "must be >= 1"),
            ("run.seed", r.seed >= 0, "must be >= 0"),
            ("run.max_consecutive_skips", r.max_consecutive_skips >= 0, "must be >= 0"),
            ("run.dist_timeout_s", r.dist_timeout_s > 0, "must be > 0"),
            ("data.batch_size", d.batch_size >= 1, "must be >= 1"),
            ("data.prefetch", d.prefetch >= 0, "must be >= 0 (0 = no prefetching)"),
            ("data.num_classes", d.num_classes >= 0, "must be >= 0"),
            ("data.latent_shape", all(v >= 1 for v in d.latent_shape), "sizes must be >= 1"),
            ("optim.lr", o.lr > 0 and math.isfinite(o.lr), "must be a positive finite number"),
            ("optim.betas", all(0 <= b < 1 for b in o.betas), "must be in [0, 1)"),
            ("optim.eps", o.eps > 0, "must be > 0"),
            ("optim.weight_decay", o.weight_decay >= 0, "must be >= 0"),
            ("optim.grad_clip", o.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
            ("schedule.warmup_steps", s.warmup_steps >= 0, "must be >= 0"),
            ("schedule.min_lr_ratio", 0 <= s.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("schedule.total_steps", s.total_steps is None or s.total_steps > s.warmup_steps,
             "must be greater than schedule.warmup_steps"),
            ("ema.decay", 0 <= self.ema.decay < 1, "must be in [0, 1)"),
            ("checkpoint.every", c.every >= 0, "must be >= 0 (0 = only at the end)"),
            ("checkpoint.keep_last", c.keep_last >= 1, "must be >= 1"),
            ("checkpoint.resume", bool(c.resume), "must be auto, none or a checkpoint folder"),
            ("logging.every", lg.every >= 1, "must be >= 1"),
            ("logging.sample_every", lg.sample_every >= 0, "must be >= 0 (0 = never)"),
            ("logging.sample_rows", lg.sample_rows >= 1, "must be >= 1"),
            ("logging.peak_tflops", lg.peak_tflops is None or lg.peak_tflops > 0, "must be > 0 (or none)"),
        ]
        if s.kind == "cosine" and s.total_steps is None:
            checks.append(("schedule.warmup_steps", s.warmup_steps < r.max_steps,
                           "must be smaller than run.max_steps for a cosine schedule"))
        for key, ok, message in checks:
            if not ok:
                section, name = key.split(".")
                raise ConfigError(f"{key} {message}; got {getattr(getattr(self, section), name)!r}")

    def require_output_dir(self) -> None:
        """Raise ``ConfigError`` when ``run.output_dir`` is empty (the ``Trainer`` calls this; parsing and
        ``validate`` accept an empty one so that e.g. ``--print-config`` works without it)."""
        if not self.run.output_dir:
            raise ConfigError("run.output_dir is required: pass --output-dir DIR (or --set run.output_dir=DIR); "
                              "a run resumes from DIR when it holds checkpoints")

    def diff(self, other: "TrainConfig") -> List[str]:
        """Dotted keys whose values differ between two configs (for resume warnings)."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{sec}.{key}" for sec in a for key in a[sec] if a[sec][key] != b[sec].get(key)]

    def changes(self, other: "TrainConfig") -> List[Tuple[str, Any, Any]]:
        """``(dotted key, value here, value in other)`` for every setting that differs; free-form
        ``options`` dicts are compared key by key (``model.options.depth``). A key missing on one side
        has the value ``UNSET``."""
        return config_changes(self.to_dict(), other.to_dict())


#: The settings that define the model and the data the model sees: a checkpoint only resumes a run
#: whose config has the same values (a dotted prefix covers the whole section).
MODEL_DEFINING = ("model", "data.latent_shape", "data.num_classes", "task.name")


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


UNSET: Any = _Unset()


def config_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs between two nested config dicts
    (as ``TrainConfig.to_dict`` or a checkpoint's stored JSON gives them); missing keys are ``UNSET``."""
    out: List[Tuple[str, Any, Any]] = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, UNSET), new.get(key, UNSET)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif a != b:
            out.append((name, a, b))
    return out


def is_model_defining(key: str) -> bool:
    """Whether a dotted config key is one of (or inside one of) ``MODEL_DEFINING``."""
    return any(key == k or key.startswith(k + ".") for k in MODEL_DEFINING)


# ---- helpers ----------------------------------------------------------------------------------
def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid: {', '.join(options)}"


def _section(cfg: TrainConfig, name: str):
    names = [f.name for f in dataclasses.fields(cfg)]
    if name not in names:
        raise ConfigError(f"unknown config section {name!r}{_suggest(name, names)}")
    return getattr(cfg, name)


def _field(sec, section: str, key: str):
    names = [f.name for f in dataclasses.fields(sec)]
    if key not in names:
        raise ConfigError(f"unknown config key {section}.{key}{_suggest(key, names)}")
    return key


def _hint(sec, key: str):
    return typing.get_type_hints(type(sec))[key]


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word such as DiT-XL/2 is a string


def _coerce(value: Any, hint: Any, key: str, from_text: bool) -> Any:
    """Convert ``value`` (override text, or a JSON value) to the annotated type, or raise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (from_text and str(value).strip().lower() in ("none", "null")):
            return None
        return _coerce(value, inner, key, from_text)
    bad = ConfigError(f"{key}: cannot use {value!r} as {getattr(hint, '__name__', hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise bad
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_text:
            try:
                return int(str(value).strip())
            except ValueError:
                try:
                    f = float(str(value).strip())
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if hint is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if from_text:
            try:
                return float(str(value).strip())
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is tuple:
        items = value
        if from_text and isinstance(value, str):
            text = value.strip()
            items = _parse_json_value(text) if text.startswith("[") else [v for v in text.split(",")]
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key, from_text) for v, a in zip(items, args))
    if origin is dict or hint is dict:
        if from_text and isinstance(value, str):
            value = _parse_json_value(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a JSON object, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported config type {hint}")  # pragma: no cover - schema bug
