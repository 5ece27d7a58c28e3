"""DiT: the class-conditional Diffusion Transformer of Peebles & Xie (2023), built from fastdit's
modules, state-dict compatible with the official checkpoints.

    model = DiT.from_name("DiT-XL/2")                 # or DiT(DiTConfig.from_name("DiT-S/2", num_classes=10))
    out = model(x, t, y)                              # x (B, 4, 32, 32), t (B,) float, y (B,) long
    model.flops_per_sample(32, 32)                    # 237.2e9 forward FLOPs for DiT-XL/2
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastdit.models.config import PatchModelConfig
from fastdit.models.flops import dit_flop_breakdown, dit_flops, training_flops
from fastdit.models.layers import (FinalLayer, LabelEmbedder, PatchEmbed, Size2, TimestepEmbedder, check_image,
                                   check_timesteps, init_dit_weights_, sincos_2d, unpatchify)
from fastdit.modules import DiTBlock

# (depth, hidden size, heads) of the paper's model sizes
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@dataclasses.dataclass
class DiTConfig(PatchModelConfig):
    """Architecture of a DiT. Defaults are DiT-XL/2 for 256 px ImageNet (latent 4×32×32).

    input_size: the latent size (int, or (height, width)) the stored ``pos_embed`` is built for; other
    sizes work too (their position tables are computed). learn_sigma: predict the variance too (the
    output has 2 × in_channels channels). class_dropout_prob: label dropout for classifier-free
    guidance; > 0 adds the null class (label ``num_classes``).

    Two numerical knobs exist to reproduce diffusers' port of DiT exactly (see
    :mod:`fastdit.integrations.diffusers.convert_dit`); their defaults are the official DiT's and change
    neither the state dict nor the outputs. timestep_freq_shift: the timestep embedding's frequencies are
    ``10000 ** (-k / (F/2 - shift))`` (F = frequency_embedding_size; official 0, diffusers 1).
    mlp_norm_eps: eps of each block's MLP-side LayerNorm (official 1e-6, diffusers' ``norm_eps`` 1e-5).
    """

    input_size: Union[int, Tuple[int, int]] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    frequency_embedding_size: int = 256
    timestep_freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6

    family = "DiT"
    PRESETS = {f"DiT-{size}/{p}": {"depth": d, "hidden_size": h, "num_heads": n, "patch_size": p}
               for size, (d, h, n) in DIT_SIZES.items() for p in (2, 4, 8)}

    def __post_init__(self):
        self._validate_common(extra_ints=("num_classes",))
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig: hidden_size must be divisible by 4 (2-D sin-cos positions), "
                             f"got {self.hidden_size}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob must lie in [0, 1), got {self.class_dropout_prob}")
        shift, half = self.timestep_freq_shift, self.frequency_embedding_size // 2
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift >= half:
            raise ValueError(f"DiTConfig.timestep_freq_shift must be a finite number below frequency_embedding_size/2 "
                             f"({half}), got {shift!r}")
        eps = self.mlp_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"DiTConfig.mlp_norm_eps must be a positive number, got {eps!r}")


class DiT(nn.Module):
    """Class-conditional DiT with AdaLN-Zero blocks (:class:`fastdit.modules.DiTBlock`).

    ``forward(x, t, y, force_drop_ids=None) -> (B, C_out, H, W)``:

    - x: (B, in_channels, H, W) latents; H and W multiples of the patch size, any aspect ratio;
    - t: (B,) timesteps in model units (DDPM step index, or rectified-flow t·1000: the objective picks
      the scale; the float is embedded as is); a scalar is broadcast;
    - y: (B,) integer labels in [0, num_classes); ``num_classes`` is the null class (no label) when the
      model has one (``class_dropout_prob > 0``). In training mode labels are dropped to the null class
      with probability ``class_dropout_prob``; ``force_drop_ids`` (B,) (bool, or 1 = drop) drops
      chosen ones in any mode;
    - output: with ``learn_sigma`` the first C channels are the prediction (noise / velocity) and the
      last C the variance interpolation; else C channels.

    State dict = the official DiT's: ``x_embedder.proj``, ``pos_embed`` (1, N, D) (a buffer: fixed, not
    trained), ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``blocks.{i}.*``,
    ``final_layer.{adaLN_modulation.1, linear}``.

    ``backend`` goes to every fastdit module (see :func:`fastdit.modules.set_module_backend`).
    ``gradient_checkpointing = True`` recomputes each block in backward (non-reentrant checkpoint).
    Label-range checks read the labels (a device sync); they are skipped under ``torch.compile``.
    """

    def __init__(self, config: Optional[DiTConfig] = None, *, backend: Optional[str] = None):
        super().__init__()
        self.config = config = config if config is not None else DiTConfig()
        if not isinstance(config, DiTConfig):
            raise ValueError(f"DiT needs a DiTConfig, got {type(config).__name__}")
        D = config.hidden_size
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, config.frequency_embedding_size,
                                           freq_shift=config.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        gh, gw = config.grid_size
        self.register_buffer("pos_embed", sincos_2d(D, gh, gw).float().unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio, mlp_norm_eps=config.mlp_norm_eps,
                                             backend=backend)
                                    for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels, backend=backend)
        self._pos_cache: Dict[tuple, Tensor] = {}
        self.initialize_weights()

    @classmethod
    def from_name(cls, name: str, *, backend: Optional[str] = None, **overrides) -> "DiT":
        """A model of the named preset (``DiTConfig.names()``), fields overridable by keyword."""
        return cls(DiTConfig.from_name(name, **overrides), backend=backend)

    def initialize_weights(self) -> None:
        """The official initialisation (see :func:`fastdit.models.layers.init_dit_weights_`) plus
        normal(0.02) for the label table; a fresh model outputs zeros."""
        init_dit_weights_(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    @property
    def null_class(self) -> Optional[int]:
        """The label meaning "no label" (``num_classes``), or None without label dropout."""
        return self.config.num_classes if self.y_embedder.has_null_class else None

    def pos_embed_for(self, grid: Size2) -> Tensor:
        """Position table (1, gh·gw, D) for a patch grid: the stored ``pos_embed`` for the configured
        size, else the sin-cos table of that grid (cached per grid, device and dtype)."""
        if tuple(grid) == self.config.grid_size:
            return self.pos_embed
        key = (tuple(grid), self.pos_embed.device, self.pos_embed.dtype)
        table = self._pos_cache.get(key)
        if table is None:
            table = sincos_2d(self.config.hidden_size, *grid, device=self.pos_embed.device)
            table = table.to(self.pos_embed.dtype).unsqueeze(0)
            if not torch.compiler.is_compiling():  # the cache is eager-only state; compiled code recomputes
                self._pos_cache[key] = table
        return table

    def _check_labels(self, y: Tensor, batch: int, force_drop_ids: Optional[Tensor]) -> None:
        if not isinstance(y, Tensor) or y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            what = y.dtype if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"DiT: labels y must be an integer tensor (torch.long), got {what}")
        if tuple(y.shape) != (batch,):
            raise ValueError(f"DiT: labels y must be (B,) = ({batch},), got {tuple(y.shape)}")
        if force_drop_ids is not None:
            if not self.y_embedder.has_null_class:
                raise ValueError("DiT: force_drop_ids needs the null class, but the model has "
                                 "class_dropout_prob = 0 (no null row in the label table)")
            if not isinstance(force_drop_ids, Tensor) or tuple(force_drop_ids.shape) != (batch,):
                shape = tuple(force_drop_ids.shape) if isinstance(force_drop_ids, Tensor) else force_drop_ids
                raise ValueError(f"DiT: force_drop_ids must be a tensor (B,) = ({batch},), got {shape}")
        if not torch.compiler.is_compiling():  # data-dependent: eager only
            top = self.config.num_classes if self.y_embedder.has_null_class else self.config.num_classes - 1
            if bool(((y < 0) | (y > top)).any()):
                null = " (num_classes is the null class)" if top == self.config.num_classes else ""
                raise ValueError(f"DiT: labels must lie in [0, {top}]{null}, got min {int(y.min())}, "
                                 f"max {int(y.max())}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        grid = check_image(x, self.config.in_channels, self.config.patch_size, "DiT")
        B = x.shape[0]
        t = check_timesteps(t, B, "DiT")
        self._check_labels(y, B, force_drop_ids)
        tokens = self.x_embedder(x) + self.pos_embed_for(grid)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        # residual carry: each block's MLP residual is added inside the next block's first fused op (and the
        # last one inside the final layer's norm), not by a kernel of its own (see DiTBlock)
        pending = None
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens, pending = checkpoint(block, tokens, c, None, pending, True, use_reentrant=False)
            else:
                tokens, pending = block(tokens, c, None, pending, True)
        out = self.final_layer(tokens, c, pending)
        return unpatchify(out, grid, self.config.patch_size, self.config.out_channels)

    def flops_per_sample(self, height: Optional[int] = None, width: Optional[int] = None, *,
                         training: bool = False) -> int:
        """FLOPs (2 × multiply-adds) of one sample's forward pass at ``height × width`` (latent pixels,
        default ``config.input_size``); ``training=True``: forward + backward (3 × forward)."""
        flops = dit_flops(self.config, height, width)
        return int(training_flops(flops)) if training else flops

    def flop_breakdown(self, height: Optional[int] = None, width: Optional[int] = None) -> Dict[str, int]:
        """Forward FLOPs of one sample by part (see :func:`fastdit.models.flops.dit_flop_breakdown`)."""
        return dit_flop_breakdown(self.config, height, width)

    def extra_repr(self) -> str:
        return f"gradient_checkpointing={self.gradient_checkpointing}"
