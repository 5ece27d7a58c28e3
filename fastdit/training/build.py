"""Building a run from a :class:`TrainConfig`: the model, the objective, the conditioning, the latent space,
this rank's dataset and the trainer's sample grid. The commands (``fastdit train``, ``fastdit sample``) and
the demo call :func:`build` and :func:`build_model`; nothing here parses arguments or trains.

    built = build(config)                       # model, objective, task, dataset, conditioner, latent space
    Trainer(config, built.model, built.task, built.dataset).fit()

What the config sections select (everything else is the trainer's, see :mod:`fastdit.training.config`):

``model``
    ``name``: a preset of :func:`fastdit.models.model_names` (``DiT-S/2``, ``MMDiT-Tiny/2``, ...);
    ``options``: its config fields (``depth``, ``hidden_size``, ...; ``backend`` is passed to the modules,
    default: the global one, i.e. the fast path on CUDA under ``auto``). ``in_channels`` and ``input_size``
    default to ``data.latent_shape``, and a DiT's ``num_classes`` to ``data.num_classes``.
``task``
    ``name``: ``rectified_flow`` (default when empty) or ``ddpm``; ``options``: keyword arguments of
    :class:`~fastdit.diffusion.RectifiedFlow` / :class:`~fastdit.diffusion.DDPM` (a rectified flow's
    ``patch_size`` defaults to the model's; a DDPM's ``variance`` defaults to ``learned_range``, the hybrid
    loss, when the model learns sigma, else ``fixed``), plus two keys of this module:
    ``caption_dropout`` (MMDiT only: caption dropout for guidance, default 0.1) and ``sampling``, the
    training sample grid: ``{"sampler", "steps", "cfg_scale", "per_class"}`` (defaults: the objective's
    sampler — euler for rectified flow, ddim for ddpm — 25 steps, guidance 4.0, 4 per class).
``data``
    ``kind``: ``synthetic`` (:class:`~fastdit.data.SyntheticLatents` of ``latent_shape`` with
    ``num_classes`` labels) or ``memory`` (a ``.pt`` or ``.npz`` file at ``path`` holding ``"x"``
    (N, C, H, W) float and ``"y"`` (N,) integer labels; an MMDiT reads ``"context"`` (N, L, caption_dim)
    and optionally ``"context_mask"`` (N, L) bool or (N,) lengths instead of ``"y"``; ``latent_shape`` is
    taken from the file). ``options``: ``shuffle`` (memory, default true), ``caption_len`` (synthetic MMDiT
    captions, default 16), ``display_scale`` and a latent space (below).

Conditioning: a DiT gets the batch's ``"y"``; an MMDiT ``"context"`` and ``"context_mask"``. With synthetic
data an MMDiT's captions are *label captions*: a fixed random (num_classes, caption_len, caption_dim) table
seeded by ``run.seed``, so class ids name captions and the class-conditional sampling below works for it.

Sample grids (the trainer's ``logging.sample_every`` and ``fastdit sample``): one row per class, guided with
classifier-free guidance against the null class (DiT) or the empty caption (MMDiT; captions in memory files
have no class ids, so such runs get no grid). Latents are shown directly — the first 3 channels as RGB
(channel 0 as grey when there are fewer than 3), divided by ``data.options.display_scale`` (default 1) and
clipped to [-1, 1] — or decoded to images when a latent space is configured: ``data.options.autoencoder``,
a ``.pt`` file ``{"config": ConvAutoencoder.config, "state_dict": ...}`` (see :func:`save_autoencoder`), or
``data.options.vae``, a diffusers ``AutoencoderKL`` directory (``vae_subfolder`` optional; it is read from
local files or the local cache only, unless ``vae_allow_download`` is true).

Caption runs (MMDiT on caption embeddings in a ``memory`` file) record their caption encoder in
``data.options.caption_encoder`` (``{"path": null, "max_length": 16}``: null = the default MiniLM of
:mod:`fastdit.text`), so ``fastdit sample RUN --prompt "a handwritten seven"`` encodes prompts the same way.

Ranks: ``RANK`` / ``WORLD_SIZE`` from torchrun's environment (or an already initialised process group), the
same the :class:`~fastdit.training.Trainer` joins; every rank builds the same model from ``run.seed``.
"""
from __future__ import annotations

import dataclasses
import inspect
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fastdit.data import (LabelCaptionLatents, StatefulDataset, SyntheticLatents, TensorDictDataset, derive_seed,
                          load_tensor_file)
from fastdit.training.build_data import (IMAGE_KINDS, STREAMING_KINDS, STREAMING_OPTIONS, StreamingData,
                                         build_streaming_dataset)
from fastdit.training.config import ConfigError, TrainConfig

TASKS = ("rectified_flow", "ddpm")
DATA_KINDS = ("synthetic", "memory") + STREAMING_KINDS
SAMPLERS_FOR = {"rectified_flow": ("euler", "heun"), "ddpm": ("ddim", "ddpm")}  # first = default
_COMMON_DATA_OPTIONS = ("display_scale", "autoencoder", "vae", "vae_subfolder", "vae_allow_download",
                        "caption_encoder")
_DATA_OPTIONS = {"synthetic": _COMMON_DATA_OPTIONS + ("caption_len",),
                 "memory": _COMMON_DATA_OPTIONS + ("shuffle",),
                 **{kind: _COMMON_DATA_OPTIONS + opts for kind, opts in STREAMING_OPTIONS.items()}}
_SAMPLING_KEYS = ("sampler", "steps", "cfg_scale", "per_class", "guidance_interval")
_TASK_KEYS = ("caption_dropout", "sampling")


# ---- ranks ------------------------------------------------------------------------------------------
def rank_and_world_size() -> Tuple[int, int]:
    """(rank, world size) as the trainer will see them: the initialised process group's, else torchrun's
    ``RANK`` / ``WORLD_SIZE`` (a single process when unset)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    from fastdit.training.distributed import _env_int

    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad distributed environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world


# ---- model ------------------------------------------------------------------------------------------
def model_family(config: TrainConfig) -> str:
    """``"DiT"`` or ``"MMDiT"`` for ``config.model.name`` (ConfigError for an unknown or empty name)."""
    from fastdit.models import DiTConfig, MMDiTConfig, model_names

    for cls in (DiTConfig, MMDiTConfig):
        if config.model.name in cls.PRESETS:
            return cls.family
    what = f"unknown model.name {config.model.name!r}" if config.model.name else "model.name is required"
    raise ConfigError(f"{what} (e.g. --set model.name=DiT-S/2); valid: {', '.join(model_names())}")


def _model_config(config: TrainConfig):
    from fastdit.models import DiTConfig, config_from_name

    name = config.model.name
    family = model_family(config)
    options = {k: v for k, v in config.model.options.items() if k != "backend"}
    c, h, w = config.data.latent_shape
    options.setdefault("in_channels", c)
    options.setdefault("input_size", h if h == w else [h, w])
    if family == "DiT" and config.data.num_classes > 0:
        options.setdefault("num_classes", config.data.num_classes)
    try:
        model_config = config_from_name(name, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None
    if model_config.in_channels != c:
        raise ConfigError(f"model.options.in_channels={model_config.in_channels} does not match "
                          f"data.latent_shape={list(config.data.latent_shape)}")
    p = model_config.patch_size
    if h % p or w % p:
        raise ConfigError(f"data.latent_shape={list(config.data.latent_shape)}: H and W must be multiples of "
                          f"the model's patch size {p}")
    extra_inputs = [f for f in ("pooled_dim", "guidance_embed") if getattr(model_config, f, None)]
    if extra_inputs:  # the trainer's data gives caption tokens only, not a CLIP pooled vector or a guidance value
        raise ConfigError(f"model.options.{extra_inputs[0]}: the trainer cannot feed an MMDiT that takes "
                          f"{'a pooled vector' if extra_inputs[0] == 'pooled_dim' else 'a guidance value'}; "
                          f"train with the pooled caption mean (pooled_dim unset) and no guidance embedding")
    if isinstance(model_config, DiTConfig):
        if config.data.num_classes < 1:
            raise ConfigError("a DiT is class-conditional: data.num_classes must be >= 1")
        if config.data.num_classes > model_config.num_classes:
            raise ConfigError(f"data.num_classes={config.data.num_classes} exceeds the model's num_classes="
                              f"{model_config.num_classes}")
    return model_config


def build_model(config: TrainConfig) -> nn.Module:
    """The model of ``config.model`` (see the module docstring), initialised from ``run.seed`` without
    touching the caller's RNG, so every rank builds the same weights."""
    from fastdit.models import create_model

    model_config = _model_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        return create_model(model_config, backend=config.model.options.get("backend"))


# ---- objective and task -----------------------------------------------------------------------------
def task_name(config: TrainConfig) -> str:
    name = config.task.name or "rectified_flow"
    if name not in TASKS:
        raise ConfigError(f"task.name must be one of {', '.join(TASKS)}; got {name!r}")
    return name


def build_objective(config: TrainConfig, model: Optional[nn.Module] = None):
    """:class:`RectifiedFlow` or :class:`DDPM` from ``task.name`` / ``task.options`` (less this module's keys)."""
    from fastdit.diffusion import DDPM, RectifiedFlow

    name = task_name(config)
    cls = RectifiedFlow if name == "rectified_flow" else DDPM
    options = {k: v for k, v in config.task.options.items() if k not in _TASK_KEYS}
    valid = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"task.options: unknown option(s) {', '.join(unknown)} for {name}; valid: "
                          f"{', '.join(valid + list(_TASK_KEYS))}")
    if name == "rectified_flow" and model is not None:
        options.setdefault("patch_size", model.config.patch_size)
    learns_sigma = model is not None and getattr(model.config, "learn_sigma", False)
    if name == "ddpm" and model is not None:
        # a DiT with learned sigma trains its variance channels with the hybrid loss (improved DDPM, DiT)
        options.setdefault("variance", "learned_range" if learns_sigma else "fixed")
        if options["variance"] == "learned_range" and not learns_sigma:
            raise ConfigError("task.options.variance=learned_range needs a model with learned sigma "
                              "(model.options.learn_sigma=true); or use variance=fixed")
    try:
        return cls(**options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"task.options: {err}") from None


def check_sampler(objective, sampler: str) -> str:
    """``sampler`` if it integrates ``objective`` (euler/heun: rectified flow; ddpm/ddim: DDPM), else a
    ValueError naming the ones that do."""
    from fastdit.diffusion import RectifiedFlow

    name = "rectified_flow" if isinstance(objective, RectifiedFlow) else "ddpm"
    fits = SAMPLERS_FOR[name]
    if sampler not in fits:
        raise ValueError(f"sampler {sampler!r} does not match the {name} objective of this run; use "
                         f"{' or '.join(fits)}")
    return sampler


def default_sampler(objective) -> str:
    from fastdit.diffusion import RectifiedFlow

    return SAMPLERS_FOR["rectified_flow" if isinstance(objective, RectifiedFlow) else "ddpm"][0]


def _options_object(given: Any, where: str, keys: Sequence[str]) -> Dict[str, Any]:
    """``given`` if it is a JSON object with no keys but ``keys``; else ConfigError naming ``where``."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where} must be an object with keys among {', '.join(keys)}, got {given!r}")
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(keys)}")
    return given


def sampling_options(config: TrainConfig, objective) -> Dict[str, Any]:
    """The training grid's sampling settings (``task.options.sampling`` over the defaults)."""
    given = _options_object(config.task.options.get("sampling") or {}, "task.options.sampling", _SAMPLING_KEYS)
    out = {"sampler": default_sampler(objective), "steps": 25, "cfg_scale": 4.0, "per_class": 4,
           "guidance_interval": None, **given}
    try:
        check_sampler(objective, out["sampler"])
    except ValueError as err:
        raise ConfigError(f"task.options.sampling: {err}") from None
    if not (isinstance(out["steps"], int) and out["steps"] >= 1 and isinstance(out["per_class"], int)
            and out["per_class"] >= 1 and isinstance(out["cfg_scale"], (int, float)) and out["cfg_scale"] >= 0):
        raise ConfigError(f"task.options.sampling: steps and per_class must be positive ints and cfg_scale a "
                          f"number >= 0; got {given}")
    interval = out["guidance_interval"]
    if interval is not None:
        if not (isinstance(interval, (list, tuple)) and len(interval) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
                and 0 <= interval[0] <= interval[1] <= 1):
            raise ConfigError(f"task.options.sampling.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1 "
                              f"(normalised times, 1 = noise), got {interval!r}")
        out["guidance_interval"] = (float(interval[0]), float(interval[1]))
    return out


# ---- conditioning -----------------------------------------------------------------------------------
class ClassConditioner:
    """Maps class ids to the model's conditional and unconditional keyword arguments.

    ``kind="labels"`` (DiT): ``{"y": labels}`` / ``{"y": null class}`` (no unconditional input when the model
    has no null class). ``kind="captions"``: ``{"context": table[labels], "context_mask": all True}`` /
    the empty caption (zero tokens, mask all False), for MMDiTs trained on label captions.
    """

    def __init__(self, num_classes: int, null_class: Optional[int] = None,
                 captions: Optional[torch.Tensor] = None):
        self.num_classes, self.null_class, self.captions = int(num_classes), null_class, captions
        self.kind = "labels" if captions is None else "captions"

    def check(self, classes: Sequence[int]) -> List[int]:
        bad = [c for c in classes if not 0 <= int(c) < self.num_classes]
        if bad:
            raise ValueError(f"class id(s) {bad} out of range: this model has classes 0..{self.num_classes - 1}")
        return [int(c) for c in classes]

    def default_classes(self, count: int) -> List[int]:
        """``count`` classes spread evenly over the range (fewer when there are fewer classes)."""
        count = max(1, min(count, self.num_classes))
        return sorted({int(i * self.num_classes // count) for i in range(count)})

    def __call__(self, labels: torch.Tensor, device) -> Tuple[Dict[str, torch.Tensor], Optional[Dict]]:
        labels = labels.to(device=device, dtype=torch.long)
        if self.kind == "labels":
            uncond = None if self.null_class is None else {"y": torch.full_like(labels, self.null_class)}
            return {"y": labels}, uncond
        context = self.captions.to(device)[labels]
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=device)
        return ({"context": context, "context_mask": mask},
                {"context": torch.zeros_like(context), "context_mask": torch.zeros_like(mask)})


def label_captions(config: TrainConfig, caption_dim: int) -> torch.Tensor:
    """The fixed (max(1, num_classes), caption_len, caption_dim) caption table of synthetic MMDiT data,
    a function of ``run.seed`` only (the same on every rank and when sampling later)."""
    length = int(config.data.options.get("caption_len", 16))
    if length < 1:
        raise ConfigError(f"data.options.caption_len must be >= 1, got {length}")
    gen = torch.Generator().manual_seed(derive_seed(config.run.seed, 0xCA9))
    return torch.randn(max(1, config.data.num_classes), length, caption_dim, generator=gen)


def build_conditioner(config: TrainConfig, model: nn.Module) -> Optional[ClassConditioner]:
    """How class ids condition this model, or None when they cannot (an MMDiT on captions from a file)."""
    if model_family(config) == "DiT":
        return ClassConditioner(config.data.num_classes, model.null_class)
    if config.data.kind != "synthetic":
        return None
    return ClassConditioner(max(1, config.data.num_classes),
                            captions=label_captions(config, model.config.caption_dim))


_CAPTION_ENCODER_KEYS = ("path", "max_length")


def caption_encoder_options(config: TrainConfig) -> Optional[Dict[str, Any]]:
    """``data.options.caption_encoder`` checked: ``{"path": local dir or None (the default MiniLM of
    fastdit.text), "max_length": L}``, or None when the run names no caption encoder."""
    given = config.data.options.get("caption_encoder")
    if given is None:
        return None
    _options_object(given, "data.options.caption_encoder", _CAPTION_ENCODER_KEYS)
    length = given.get("max_length", 77)
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ConfigError(f"data.options.caption_encoder.max_length must be an int >= 2, got {length!r}")
    path = given.get("path")
    if path is not None and not isinstance(path, str):
        raise ConfigError(f"data.options.caption_encoder.path must be a directory path, got {path!r}")
    return {"path": path, "max_length": length}


class PromptConditioner:
    """Maps caption strings to an MMDiT's conditional and unconditional keyword arguments through the run's
    caption encoder (``data.options.caption_encoder``): ``{"context": (B, L, D), "context_mask": (B, L)}``
    and, unconditional, the null caption the model is trained on (no real token: zeros, mask all False)."""

    def __init__(self, encoder, max_length: int):
        self.encoder, self.max_length = encoder, int(max_length)

    def check(self, prompts: Sequence[str]) -> List[str]:
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("no prompts given")
        return prompts

    def __call__(self, prompts: Sequence[str], device) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        context, mask = self.encoder.encode(list(prompts), max_length=self.max_length)
        context, mask = context.to(device), mask.to(device)
        return ({"context": context, "context_mask": mask},
                {"context": torch.zeros_like(context), "context_mask": torch.zeros_like(mask)})


def build_prompt_conditioner(config: TrainConfig, model: nn.Module) -> PromptConditioner:
    """The :class:`PromptConditioner` of an MMDiT run that names its caption encoder; ValueError saying what
    is missing otherwise (a DiT, or a run trained on caption embeddings of an unrecorded encoder)."""
    if model_family(config) != "MMDiT":
        raise ValueError(f"{config.model.name} is class-conditional: sample it with --classes, not prompts")
    options = caption_encoder_options(config)
    if options is None:
        raise ValueError("this run does not name its caption encoder (data.options.caption_encoder), so prompts "
                         "cannot be encoded the way its training captions were; add it to the run's config.json, "
                         "e.g. \"caption_encoder\": {\"max_length\": 16} for the default MiniLM encoder")
    from fastdit.text import CaptionEncoder

    try:
        encoder = CaptionEncoder(options["path"], max_length=options["max_length"])
    except ImportError as err:
        raise ValueError(f"the run's caption encoder is not installed: {err}") from None
    if encoder.embed_dim != model.config.caption_dim:
        raise ValueError(f"the caption encoder gives {encoder.embed_dim}-dim embeddings but the model takes "
                         f"caption_dim={model.config.caption_dim}")
    return PromptConditioner(encoder, options["max_length"])


# ---- latent space and display -----------------------------------------------------------------------
def save_autoencoder(autoencoder: nn.Module, path: str) -> None:
    """Write a :class:`~fastdit.latents.ConvAutoencoder` as ``{"config", "state_dict"}`` for
    ``data.options.autoencoder`` (loads with ``weights_only=True``)."""
    torch.save({"config": dict(autoencoder.config), "state_dict": autoencoder.state_dict()}, path)


def load_autoencoder(path: str) -> nn.Module:
    """The :class:`~fastdit.latents.ConvAutoencoder` of a file written by :func:`save_autoencoder`
    (``torch.load(weights_only=True)``); ValueError naming the file and what is wrong with it."""
    from fastdit.latents import ConvAutoencoder

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not an autoencoder file or holds an unsafe pickle "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not isinstance(saved, dict) or not {"config", "state_dict"} <= set(saved):
        raise ValueError(f"{path} is not a {{'config', 'state_dict'}} file (see "
                         f"fastdit.training.build.save_autoencoder)")
    try:
        autoencoder = ConvAutoencoder(**saved["config"])
        autoencoder.load_state_dict(saved["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} does not describe a ConvAutoencoder: {str(err).splitlines()[0]}") from None
    return autoencoder


def build_latent_space(config: TrainConfig) -> Optional[nn.Module]:
    """The latent space of ``data.options`` (``autoencoder`` or ``vae``), or None: latents shown directly."""
    opts = config.data.options
    if opts.get("autoencoder") and opts.get("vae"):
        raise ConfigError("data.options: give either autoencoder or vae, not both")
    space = None
    if opts.get("autoencoder"):
        try:
            space = load_autoencoder(opts["autoencoder"])
        except ValueError as err:
            raise ConfigError(f"data.options.autoencoder: {err}") from None
    elif opts.get("vae"):
        from fastdit.latents import AutoencoderKLLatents

        allow = opts.get("vae_allow_download", False)
        if not isinstance(allow, bool):
            raise ConfigError(f"data.options.vae_allow_download must be true or false, got {allow!r}")
        try:
            space = AutoencoderKLLatents.from_pretrained(opts["vae"], subfolder=opts.get("vae_subfolder"),
                                                         allow_download=allow)
        except FileNotFoundError as err:
            raise ConfigError(f"data.options.vae: {err}") from None
    if space is not None:
        space.eval().requires_grad_(False)
        if config.data.kind not in IMAGE_KINDS and space.latent_channels != config.data.latent_shape[0]:
            raise ConfigError(f"the latent space has {space.latent_channels} channels but data.latent_shape is "
                              f"{list(config.data.latent_shape)}")
    return space


def latents_to_images(latents: torch.Tensor, latent_space: Optional[nn.Module] = None,
                      display_scale: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, 1 or 3, H', W') images in [-1, 1] for a grid: decoded through
    ``latent_space`` when given (1 or 3 image channels kept), else the first 3 channels (channel 0 when
    C < 3) divided by ``display_scale``."""
    if latent_space is not None:
        param = next(iter(latent_space.parameters()), None)
        dev = param.device if param is not None else latents.device
        images = latent_space.decode(latents.to(dev, torch.float32)).float()
    else:
        images = latents.float() / float(display_scale)
    images = images[:, :3] if images.shape[1] >= 3 else images[:, :1]
    return images.clamp(-1, 1)


def display_scale(config: TrainConfig) -> float:
    scale = config.data.options.get("display_scale", 1.0)
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ConfigError(f"data.options.display_scale must be a number > 0, got {scale!r}")
    return float(scale)


# ---- data -------------------------------------------------------------------------------------------
def _memory_tensors(config: TrainConfig, family: str) -> Dict[str, torch.Tensor]:
    path = config.data.path
    if not path:
        raise ConfigError("data.kind=memory needs data.path (a .pt or .npz file with tensors 'x' and 'y')")
    try:
        data = load_tensor_file(path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    x = data.get("x")
    if x is None or x.dim() != 4 or not x.is_floating_point():
        raise ConfigError(f"data.path: {path} needs 'x', float latents (N, C, H, W); got "
                          f"{None if x is None else (tuple(x.shape), x.dtype)} (keys: {sorted(data)})")
    n = x.shape[0]
    out = {"x": x.float()}
    if family == "DiT":
        y = data.get("y")
        if y is None or tuple(y.shape) != (n,) or y.is_floating_point() or y.dtype == torch.bool:
            raise ConfigError(f"data.path: {path} needs 'y', integer labels ({n},); got "
                              f"{None if y is None else (tuple(y.shape), y.dtype)}")
        y = y.long()
        if n and (int(y.min()) < 0 or int(y.max()) >= config.data.num_classes):
            raise ConfigError(f"data.path: labels in {path} span [{int(y.min())}, {int(y.max())}] but "
                              f"data.num_classes={config.data.num_classes}")
        out["y"] = y
    else:
        context = data.get("context")
        if context is None or context.dim() != 3 or context.shape[0] != n or not context.is_floating_point():
            raise ConfigError(f"data.path: an MMDiT needs 'context', float captions (N, L, caption_dim) in {path}")
        mask = data.get("context_mask")
        length = context.shape[1]
        if mask is None:
            mask = torch.ones(n, length, dtype=torch.bool)
        elif tuple(mask.shape) == (n,):
            mask = torch.arange(length)[None, :] < mask.long()[:, None]
        elif tuple(mask.shape) != (n, length):
            raise ConfigError(f"data.path: context_mask must be (N, L) or lengths (N,), got {tuple(mask.shape)}")
        out["context"], out["context_mask"] = context.float(), mask.bool()
    return out


def build_dataset(config: TrainConfig, *, rank: int = 0, world_size: int = 1,
                  captions: Optional[torch.Tensor] = None, latent_space: Optional[nn.Module] = None
                  ) -> StatefulDataset:
    """This rank's dataset of ``data.kind`` (see the module docstring and, for the streaming kinds,
    :mod:`fastdit.training.build_data`). For ``memory`` and the streaming kinds it also sets
    ``config.data.latent_shape`` from the data, so the stored config rebuilds the model without it.
    ``latent_space``: the run's (the image kinds encode through it; built here when not given)."""
    return _build_data(config, rank=rank, world_size=world_size, captions=captions,
                       latent_space=latent_space).dataset


def _build_data(config: TrainConfig, *, rank: int, world_size: int, captions: Optional[torch.Tensor],
                latent_space: Optional[nn.Module]) -> StreamingData:
    """:func:`build_dataset` with the latent shape and caption length it found."""
    d = config.data
    if d.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}; got {d.kind!r}")
    unknown = sorted(set(d.options) - set(_DATA_OPTIONS[d.kind]))
    if unknown:
        raise ConfigError(f"data.options: unknown key(s) {', '.join(unknown)} for kind {d.kind}; valid: "
                          f"{', '.join(_DATA_OPTIONS[d.kind])}")
    family = model_family(config)
    if d.kind == "synthetic":
        if family == "DiT" and d.num_classes < 1:
            raise ConfigError("a DiT needs labels: data.num_classes must be >= 1")
        inner = SyntheticLatents(d.latent_shape, d.batch_size, num_classes=d.num_classes, seed=config.run.seed,
                                 rank=rank, world_size=world_size)
        if family == "DiT":
            return StreamingData(inner, tuple(d.latent_shape), None)
        if captions is None:
            raise ValueError("synthetic MMDiT data needs the caption table (see label_captions)")
        return StreamingData(LabelCaptionLatents(inner, captions), tuple(d.latent_shape), captions.shape[1])
    if d.kind in STREAMING_KINDS:
        if latent_space is None and d.kind in IMAGE_KINDS:
            latent_space = build_latent_space(config)
        data = build_streaming_dataset(config, family, rank=rank, world_size=world_size, latent_space=latent_space)
        d.latent_shape = data.latent_shape
        return data
    tensors = _memory_tensors(config, family)
    d.latent_shape = tuple(int(s) for s in tensors["x"].shape[1:])
    shuffle = d.options.get("shuffle", True)
    if not isinstance(shuffle, bool):
        raise ConfigError(f"data.options.shuffle must be true or false, got {shuffle!r}")
    try:
        dataset = TensorDictDataset(tensors, d.batch_size, seed=config.run.seed, rank=rank, world_size=world_size,
                                    shuffle=shuffle)
    except ValueError as err:
        raise ConfigError(f"data.path: {err}") from None
    return StreamingData(dataset, d.latent_shape, tensors["context"].shape[1] if "context" in tensors else None)


# ---- the whole run ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    """Everything :func:`build` makes: pass ``model``, ``task``, ``dataset`` to the Trainer."""
    config: TrainConfig
    model: nn.Module
    objective: Any
    task: Any
    dataset: StatefulDataset
    conditioner: Optional[ClassConditioner]
    latent_space: Optional[nn.Module]


def make_sample_fn(config: TrainConfig, objective, conditioner: Optional[ClassConditioner],
                   latent_space: Optional[nn.Module]) -> Optional[Callable[[nn.Module, int], torch.Tensor]]:
    """The trainer's ``samples(model, step)``: ``logging.sample_rows`` classes (one per row) times
    ``per_class`` samples, guided, seeded with ``run.seed``; None when class ids cannot condition the model."""
    if conditioner is None:
        return None
    from fastdit.diffusion import sample

    opts = sampling_options(config, objective)
    scale = display_scale(config)
    classes = conditioner.default_classes(config.logging.sample_rows)
    labels = torch.tensor(classes).repeat_interleave(opts["per_class"])
    shape = (len(labels), *config.data.latent_shape)
    autocast = config.run.precision in ("bf16", "fp8")

    def samples(model: nn.Module, step: int) -> torch.Tensor:
        device = next(model.parameters()).device
        cond, uncond = conditioner(labels, device)
        cfg = opts["cfg_scale"] if uncond is not None else 1.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            x = sample(model, shape, cond, uncond, cfg, opts["sampler"], opts["steps"], objective=objective,
                       guidance_interval=opts["guidance_interval"], seed=config.run.seed, device=device,
                       progress=False)
        if latent_space is not None:
            latent_space.to(device)
        return latents_to_images(x, latent_space, scale)

    return samples


def build(config: TrainConfig, *, rank: Optional[int] = None, world_size: Optional[int] = None) -> Built:
    """Model, objective, :class:`~fastdit.diffusion.task.DiffusionTask` (training FLOPs, tokens, sample grid)
    and this rank's dataset from ``config`` (rank / world size from the environment unless given)."""
    from fastdit.diffusion.task import DiffusionTask

    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    config.validate()
    family = model_family(config)
    if "caption_dropout" in config.task.options and family != "MMDiT":
        raise ConfigError("task.options.caption_dropout applies to MMDiT (a DiT drops labels itself: "
                          "model.options.class_dropout_prob)")
    captions = None
    if family == "MMDiT" and config.data.kind == "synthetic":
        captions = label_captions(config, _model_config(config).caption_dim)
    # Image data is encoded through the latent space, which decides the latent shape; other data sets
    # data.latent_shape itself (memory, latent shards), and the latent space is then checked against it.
    latent_space = build_latent_space(config) if config.data.kind in IMAGE_KINDS else None
    data = _build_data(config, rank=rank, world_size=world_size, captions=captions,
                       latent_space=latent_space)  # may set latent_shape
    if latent_space is None:
        latent_space = build_latent_space(config)
    dataset = data.dataset
    model = build_model(config)
    objective = build_objective(config, model)
    conditioner = None
    if family == "DiT":
        conditioner = ClassConditioner(config.data.num_classes, model.null_class)
    elif captions is not None:
        conditioner = ClassConditioner(captions.shape[0], captions=captions)
    _, h, w = config.data.latent_shape
    tokens = (h // model.config.patch_size) * (w // model.config.patch_size)
    if family == "DiT":
        flops = model.flops_per_sample(h, w, training=True)
        cond_keys: Tuple[str, ...] = ("y",)
        dropout = 0.0
    else:
        caption_len = data.caption_len
        flops = model.flops_per_sample(h, w, caption_len=caption_len, training=True)
        tokens += caption_len
        cond_keys = ("context", "context_mask")
        dropout = config.task.options.get("caption_dropout", 0.1)
    sampling_options(config, objective)  # validate early, not at the first grid
    caption_encoder_options(config)
    try:
        task = DiffusionTask(objective, cond_keys, caption_dropout=dropout, flops_per_sample=flops,
                             tokens_per_sample=tokens,
                             samples=make_sample_fn(config, objective, conditioner, latent_space))
    except ValueError as err:
        raise ConfigError(f"task.options: {err}") from None
    return Built(config, model, objective, task, dataset, conditioner, latent_space)
