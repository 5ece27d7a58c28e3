"""MMDiT: a caption-conditional latent DiT with symmetric joint attention (SD3-like, and Flux-like with
single-stream blocks), built from fastdit's :class:`~fastdit.modules.JointDiTBlock` and
:class:`~fastdit.modules.SingleStreamDiTBlock`.

    model = MMDiT.from_name("MMDiT-S/2", caption_dim=384)
    out = model(x, t, context, context_mask)     # x (B, 4, H, W), t (B,), context (B, L, 384), lengths (B,)

Image tokens come from a Conv2d patchify, with a learned position table, 2-D axial RoPE, Flux's multi-axis
RoPE (``rope_axes_dims``) or SD3's fixed, centre-cropped sin-cos table (``"sincos_crop"``); caption tokens
(B, L, caption_dim) are projected to the model width and carry no position. The conditioning vector is
``c = MLP_t(Emb(t)) [+ MLP_g(Emb(guidance))] + MLP_p(pooled)``, where pooled is the mean of the real
caption tokens or (``pooled_dim``) a separate pooled caption vector (CLIP's, in SD3 and Flux). Each joint
(double-stream) block has separate weights per stream and one attention over both; by default the last
one is context-pre-only (as in SD3): its caption stream only supplies keys and values, since nothing reads
the caption stream after it. ``single_depth`` single-stream blocks (Flux) may follow the double blocks.

The weight converters from and to diffusers' ``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` are
in :mod:`fastdit.integrations.diffusers.convert_mmdit`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastdit.models.config import PatchModelConfig
from fastdit.models.flops import mmdit_flop_breakdown, mmdit_flops, training_flops
from fastdit.models.layers import (FinalLayer, PatchEmbed, Size2, TimestepEmbedder, check_image, check_timesteps,
                                   init_dit_weights_, sincos_1d, sincos_2d, unpatchify)
from fastdit.modules import (AdaLNModulation, JointAttention, JointDiTBlock, Mlp, ModulatedLayerNorm, RMSNorm,
                             SingleStreamDiTBlock)
from fastdit.modules.blocks import add_pending, modulated_input
from fastdit.ops.adaln import per_token
from fastdit.ops.attention import joint_attention
from fastdit.ops.qk_norm_rotary import qk_norm_rope
from fastdit.ops.rmsnorm import rms_norm
from fastdit.ops.rotary import rope_freqs, rope_freqs_2d

# (depth, hidden size, heads): DiT's sizes, plus a tiny one for tests and demos
MMDIT_SIZES = {"Tiny": (2, 128, 2), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
               "XL": (28, 1152, 16)}
POS_EMBED_KINDS = ("rope", "learned", "sincos_crop")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class MMDiTConfig(PatchModelConfig):
    """Architecture of an MMDiT.

    input_size: the latent size (int or (height, width)) the learned position table is built for
    (other sizes interpolate it; RoPE tables are computed for any size). caption_dim: width of the
    caption encoder's tokens (384 for all-MiniLM-L6-v2). pos_embed: ``"rope"`` (RoPE on the image
    tokens' queries and keys: 2-D axial, head dim divisible by 4, or multi-axis with ``rope_axes_dims``),
    ``"learned"`` (a table added to the image tokens) or ``"sincos_crop"`` (SD3: a fixed 2-D sin-cos table
    added to the image tokens, built for a ``pos_embed_max_size``² grid whose positions are scaled by
    ``base_size / pos_embed_max_size`` with base_size = the rows of ``input_size``'s patch grid, and
    centre-cropped to each input's grid). learn_sigma: output 2 × in_channels channels.

    depth: the number of double-stream (joint) blocks; single_depth: the number of single-stream blocks
    after them (Flux; keys ``single_blocks.{i}.*``). context_pre_only_last: the last double block is
    context-pre-only (SD3; needs single_depth = 0) or a full double block (Flux: False).
    pooled_dim: None = the pooled conditioning is the mean of the real caption tokens; an int = the model
    takes a separate pooled vector ``pooled`` (B, pooled_dim) (CLIP's pooled output in SD3/Flux).
    guidance_embed: Flux-dev's guidance embedding (a second timestep MLP on ``guidance``, added to c).
    rope_axes_dims: Flux's RoPE (e.g. (16, 56, 56), summing to the head dim): image token ids are
    (0, …, 0, row, col) over the patch grid, caption ids all 0 (the identity rotation); None = 2-D axial
    RoPE, which equals ``(head_dim/2, head_dim/2)``. pos_embed_max_size: the grid side of the
    ``"sincos_crop"`` table (SD3's ``pos_embed_max_size``).
    """

    input_size: Union[int, Tuple[int, int]] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    caption_dim: int = 384
    qk_norm: bool = True
    pos_embed: str = "rope"
    rope_theta: float = 10000.0
    learn_sigma: bool = False
    frequency_embedding_size: int = 256
    single_depth: int = 0
    context_pre_only_last: bool = True
    pooled_dim: Optional[int] = None
    guidance_embed: bool = False
    rope_axes_dims: Optional[Tuple[int, ...]] = None
    pos_embed_max_size: Optional[int] = None

    family = "MMDiT"
    PRESETS = {f"MMDiT-{size}/{p}": {"depth": d, "hidden_size": h, "num_heads": n, "patch_size": p}
               for size, (d, h, n) in MMDIT_SIZES.items() for p in (2, 4, 8)}

    def __post_init__(self):
        self._validate_common(extra_ints=("caption_dim",))
        if self.pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"MMDiTConfig.pos_embed must be one of {', '.join(POS_EMBED_KINDS)}, "
                             f"got {self.pos_embed!r}")
        for name in ("context_pre_only_last", "guidance_embed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MMDiTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not _is_int(self.single_depth) or self.single_depth < 0:
            raise ValueError(f"MMDiTConfig.single_depth must be an int >= 0, got {self.single_depth!r}")
        if self.single_depth and self.context_pre_only_last:
            raise ValueError("MMDiTConfig: single_depth > 0 needs context_pre_only_last=False (a context-pre-only "
                             "last double block drops the caption stream that the single-stream blocks read)")
        if self.pooled_dim is not None and (not _is_int(self.pooled_dim) or self.pooled_dim < 1):
            raise ValueError(f"MMDiTConfig.pooled_dim must be None or a positive int, got {self.pooled_dim!r}")
        self._validate_positions()

    def _validate_positions(self) -> None:
        if self.rope_axes_dims is not None:
            axes = self.rope_axes_dims
            if isinstance(axes, (str, bytes)) or not hasattr(axes, "__len__") or len(axes) < 2 or not all(
                    _is_int(a) and a > 0 and a % 2 == 0 for a in axes):
                raise ValueError(f"MMDiTConfig.rope_axes_dims must be >= 2 positive even ints (e.g. (16, 56, 56)), "
                                 f"got {axes!r}")
            self.rope_axes_dims = tuple(axes)
            if self.pos_embed != "rope":
                raise ValueError(f"MMDiTConfig: rope_axes_dims is for pos_embed='rope', got pos_embed="
                                 f"{self.pos_embed!r}")
            if sum(self.rope_axes_dims) != self.head_dim:
                raise ValueError(f"MMDiTConfig: rope_axes_dims {list(self.rope_axes_dims)} must sum to the head dim "
                                 f"{self.head_dim}")
        elif self.pos_embed == "rope" and self.head_dim % 4:
            raise ValueError(f"MMDiTConfig: 2-D RoPE needs a head dim divisible by 4, got {self.head_dim}")
        if self.pos_embed in ("learned", "sincos_crop") and self.hidden_size % 4:
            raise ValueError(f"MMDiTConfig: the {self.pos_embed} table is 2-D sin-cos and needs hidden_size "
                             f"divisible by 4, got {self.hidden_size}")
        if self.pos_embed == "sincos_crop":
            size = self.pos_embed_max_size
            if not _is_int(size) or size < 1:
                raise ValueError(f"MMDiTConfig: pos_embed='sincos_crop' needs pos_embed_max_size, a positive int, "
                                 f"got {size!r}")
            if max(self.grid_size) > size:
                raise ValueError(f"MMDiTConfig: input_size's patch grid {self.grid_size} exceeds "
                                 f"pos_embed_max_size {size}")
        elif self.pos_embed_max_size is not None:
            raise ValueError(f"MMDiTConfig: pos_embed_max_size is for pos_embed='sincos_crop', got pos_embed="
                             f"{self.pos_embed!r}")


def sincos_crop_table(dim: int, max_size: int, base_size: int, interpolation_scale: float = 1.0) -> Tensor:
    """SD3's fixed position table (diffusers' ``PatchEmbed(pos_embed_max_size=...)``): the 2-D sin-cos table
    of a ``max_size × max_size`` grid whose positions are ``i / (max_size / base_size) / interpolation_scale``,
    (max_size², dim) float32, tokens row-major, the first dim/2 channels encoding the column (as DiT's).
    Positions are computed in float32, angles in float64, the table rounded to float32 — the steps of
    diffusers' ``get_2d_sincos_pos_embed``, so the table is bitwise SD3's."""
    pos = torch.arange(max_size, dtype=torch.float32) / (max_size / base_size) / interpolation_scale
    rows, cols = pos.repeat_interleave(max_size), pos.repeat(max_size)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class PooledCaptionEmbedder(nn.Module):
    """Pooled caption features (B, caption_dim or pooled_dim) -> (B, hidden): ``mlp = Linear, SiLU, Linear``."""

    def __init__(self, caption_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(caption_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.mlp(pooled)


class ContextPreOnlyAttention(JointAttention):
    """Joint attention of the last MMDiT block: image queries attend over image and caption keys;
    the caption stream supplies keys and values only (``txt_kv``, and ``txt_k_norm`` with QK-norm).
    Image keys are those of :class:`JointAttention` (``qkv``, ``proj``, ``q_norm``, ``k_norm``).

    The joint-attention op takes queries for both streams: the caption keys stand in for the caption
    queries (detached), and those outputs are dropped — a few extra query rows instead of a second
    attention implementation. ``forward`` returns ``(x_out, None)``.
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool = True, rope_interleaved: bool = True,
                 eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__(dim, num_heads, joint=False, qkv_bias=True, qk_norm=qk_norm,
                         rope_interleaved=rope_interleaved, eps=eps, backend=backend)
        self.txt_kv = nn.Linear(dim, 2 * dim, bias=True)
        if qk_norm:
            self.txt_k_norm = RMSNorm(self.head_dim, eps, backend)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, txt_mask: Optional[Tensor] = None,
                img_freqs: Optional[Tensor] = None, txt_freqs: Optional[Tensor] = None) -> Tuple[Tensor, None]:
        if context is None or txt_freqs is not None:
            raise ValueError("ContextPreOnlyAttention needs caption tokens and takes no caption RoPE table")
        B, N, _ = x.shape
        L = context.shape[1]
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        if self.qk_norm or img_freqs is not None:
            q, k = qk_norm_rope(q, k, self.q_norm.weight if self.qk_norm else None,
                                self.k_norm.weight if self.qk_norm else None, img_freqs, self.eps,
                                self.rope_interleaved, backend=self.backend)
        kt, vt = self.txt_kv(context).view(B, L, 2, self.num_heads, self.head_dim).unbind(2)
        if self.qk_norm:
            kt = rms_norm(kt, self.txt_k_norm.weight, self.eps, backend=self.backend)
        out, _ = joint_attention(q, k, v, kt.detach(), kt, vt, txt_mask, backend=self.backend)
        return self.proj(out.reshape(x.shape)), None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, context_pre_only=True, qk_norm={self.qk_norm}, "
                f"backend={self.backend!r}")


class ContextPreOnlyJointBlock(nn.Module):
    """The last MMDiT block (SD3's ``context_pre_only``): the image stream is a full block; the caption
    stream is LayerNorm + shift/scale (``txt_adaLN_modulation``, 2 chunks) feeding keys and values.

    Same call as :class:`~fastdit.modules.JointDiTBlock`:
    ``forward(x, context, c, txt_mask=None, img_freqs=None, txt_freqs=None) -> (x, context)``, with the
    caption tokens returned unchanged (no later layer reads them)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = True,
                 rope_interleaved: bool = True, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.txt_norm1 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.attn = ContextPreOnlyAttention(hidden_size, num_heads, qk_norm=qk_norm,
                                            rope_interleaved=rope_interleaved, backend=backend)
        self.norm2 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), backend=backend)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6)
        self.txt_adaLN_modulation = AdaLNModulation(hidden_size, 2)

    def forward(self, x: Tensor, context: Tensor, c: Tensor, txt_mask: Optional[Tensor] = None,
                img_freqs: Optional[Tensor] = None, txt_freqs: Optional[Tensor] = None,
                pending: Optional[Tuple] = None, defer_residual: bool = False):
        """As :class:`JointDiTBlock` (residual carry included); the caption stream ends here, so a deferred
        result carries the image residual only: ``(x, context, ((y, gate), None))``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)
        t_shift, t_scale = self.txt_adaLN_modulation(c)
        img_pending, txt_pending = pending if pending is not None else (None, None)
        x, h = modulated_input(self.norm1, x, img_pending, shift1, scale1)
        context, hc = modulated_input(self.txt_norm1, context, txt_pending, t_shift, t_scale)
        attn_x, _ = self.attn(h, hc, txt_mask, img_freqs, txt_freqs)
        x, h = self.norm2.gated(x, attn_x, gate1, shift2, scale2)
        y = self.mlp(h)
        if defer_residual:
            return x, context, ((y, gate2), None)
        return x + per_token(gate2) * y, context


def caption_mask(context_mask: Optional[Tensor], batch: int, length: int, device: torch.device,
                 who: str = "MMDiT") -> Optional[Tensor]:
    """context_mask as bool (B, L), True = real token: from a bool mask (B, L) or lengths (B,) (the first
    ``len`` tokens are real); None stays None (all real). Length checks read the values (eager only)."""
    if context_mask is None:
        return None
    if not isinstance(context_mask, Tensor):
        raise ValueError(f"{who}: context_mask must be a bool tensor (B, L) or lengths (B,), "
                         f"got {type(context_mask).__name__}")
    if context_mask.dtype == torch.bool:
        if tuple(context_mask.shape) != (batch, length):
            raise ValueError(f"{who}: a bool context_mask must be (B, L) = ({batch}, {length}), "
                             f"got {tuple(context_mask.shape)}")
        return context_mask.to(device)
    if context_mask.is_floating_point() or context_mask.is_complex():
        raise ValueError(f"{who}: context_mask must be bool (B, L) or integer lengths (B,), got {context_mask.dtype}")
    if tuple(context_mask.shape) != (batch,):
        raise ValueError(f"{who}: integer context_mask holds caption lengths and must be (B,) = ({batch},), "
                         f"got {tuple(context_mask.shape)}")
    if not torch.compiler.is_compiling() and bool(((context_mask < 0) | (context_mask > length)).any()):
        raise ValueError(f"{who}: caption lengths must lie in [0, {length}], got {context_mask.tolist()}")
    lengths = context_mask.to(device)
    return torch.arange(length, device=device) < lengths[:, None]


CAPTION_TRIM_MULTIPLE = 16  # trimmed caption lengths are rounded up to this: fewer distinct shapes, aligned tiles


def trim_caption_padding(context: Tensor, mask: Optional[Tensor], multiple: int = CAPTION_TRIM_MULTIPLE
                         ) -> Tuple[Tensor, Optional[Tensor]]:
    """``context`` (B, L, D) and its bool ``mask`` (B, L) cut to the first ``keep`` caption positions, where
    ``keep`` is one past the last position that is real in any sample, rounded up to ``multiple`` (at most L,
    at least 1). Every position dropped is padding in every sample, and padding takes no part in an MMDiT's
    output (masked out as a key, its own rows discarded, caption tokens carry no position), so the model's
    output and the gradients of everything kept are unchanged while the text stream's GEMMs and the attention
    cost what the longest real caption costs: Flux pads T5 captions to 512 tokens, a typical prompt has ~80.
    Reads the mask's values (one device sync when it is on a GPU); None (all real) returns the inputs."""
    if mask is None:
        return context, None
    keep = caption_keep(mask, multiple)
    if keep == mask.shape[1]:
        return context, mask
    return context[:, :keep], mask[:, :keep]


def caption_keep(mask: Tensor, multiple: int = CAPTION_TRIM_MULTIPLE) -> int:
    """How many leading caption positions :func:`trim_caption_padding` keeps for the bool ``mask`` (B, L): one
    past the last position real in any sample, rounded up to ``multiple``, within [1, L]."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = int((mask.any(0) * positions).max())  # 0 when nothing is real; one device sync
    return min(mask.shape[1], max(1, -(-last // multiple) * multiple))


class MMDiT(nn.Module):
    """Caption-conditional latent DiT with symmetric joint attention (SD3-like; Flux-like with
    single-stream blocks).

    ``forward(x, t, context, context_mask=None, *, pooled=None, guidance=None) -> (B, C_out, H, W)``:

    - x: (B, in_channels, H, W) latents, H and W multiples of the patch size, any aspect ratio;
    - t: (B,) timesteps in model units (e.g. rectified-flow t·1000), or a scalar;
    - context: (B, L, caption_dim) caption tokens (L ≥ 1; any padded length);
    - context_mask: which caption tokens are real, bool (B, L) or lengths (B,); None = all real.
      Padded tokens take no part: they are zeroed before the projections, masked out as attention keys,
      and left out of the pooled mean. A sample with no real tokens gets a pooled mean of 0 and its image
      tokens attend over the image only;
    - pooled: (B, pooled_dim), only and always for a model with ``config.pooled_dim`` (CLIP's pooled output
      in SD3/Flux); else the pooled conditioning is the mean of the real caption tokens;
    - guidance: (B,) or a scalar, only and always with ``config.guidance_embed`` (Flux-dev): embedded like t,
      in the same units (Flux embeds 1000 × the guidance scale).

    Keys: ``x_embedder.proj``, ``pos_embed`` (learned variant: (1, N, D) parameter; the ``"sincos_crop"``
    table is a non-persistent buffer), ``context_embedder``, ``t_embedder.mlp``, ``pooled_embedder.mlp``,
    ``guidance_embedder.mlp`` (with guidance_embed), ``blocks.{i}.*`` (JointDiTBlock's keys; a
    context-pre-only last block has ``attn.txt_kv`` and a 2-chunk ``txt_adaLN_modulation``),
    ``single_blocks.{i}.*`` (SingleStreamDiTBlock's keys), ``final_layer``.

    ``backend`` goes to every fastdit module; ``gradient_checkpointing = True`` recomputes each block
    in backward. ``trim_caption_padding`` (default True): eagerly, caption positions that are padding in every
    sample of the batch are cut off before the blocks (:func:`trim_caption_padding`: same output, less work);
    under ``torch.compile`` or CUDA-graph capture the model runs on the buffer as given (a data-dependent
    length would break the graph): call :func:`trim_caption_padding` on the batch before a compiled model for
    the same saving; the samplers do it once per run (:meth:`trim_conditioning`).
    """

    def __init__(self, config: Optional[MMDiTConfig] = None, *, backend: Optional[str] = None):
        super().__init__()
        self.config = config = config if config is not None else MMDiTConfig()
        if not isinstance(config, MMDiTConfig):
            raise ValueError(f"MMDiT needs an MMDiTConfig, got {type(config).__name__}")
        D = config.hidden_size
        self.gradient_checkpointing = False
        self.trim_caption_padding = True
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.context_embedder = nn.Linear(config.caption_dim, D)
        self.t_embedder = TimestepEmbedder(D, config.frequency_embedding_size)
        self.pooled_embedder = PooledCaptionEmbedder(config.pooled_dim or config.caption_dim, D)
        if config.guidance_embed:
            self.guidance_embedder = TimestepEmbedder(D, config.frequency_embedding_size)
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size[0] * config.grid_size[1], D))
        elif config.pos_embed == "sincos_crop":
            # a buffer (it follows .to(dtype), as diffusers' does), not saved: it is a function of the config
            table = sincos_crop_table(D, config.pos_embed_max_size, config.grid_size[0])
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        block_args = dict(mlp_ratio=config.mlp_ratio, qk_norm=config.qk_norm, backend=backend)
        n_full = config.depth - 1 if config.context_pre_only_last else config.depth
        blocks = [JointDiTBlock(D, config.num_heads, **block_args) for _ in range(n_full)]
        if config.context_pre_only_last:
            blocks.append(ContextPreOnlyJointBlock(D, config.num_heads, **block_args))
        self.blocks = nn.ModuleList(blocks)
        self.single_blocks = nn.ModuleList(SingleStreamDiTBlock(D, config.num_heads, **block_args)
                                           for _ in range(config.single_depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels, backend=backend)
        self._rope_cache: Dict[tuple, Tensor] = {}
        self.initialize_weights()

    @classmethod
    def from_name(cls, name: str, *, backend: Optional[str] = None, **overrides) -> "MMDiT":
        """A model of the named preset (``MMDiTConfig.names()``), fields overridable by keyword."""
        return cls(MMDiTConfig.from_name(name, **overrides), backend=backend)

    def initialize_weights(self) -> None:
        """DiT's initialisation (xavier linears, zero AdaLN and final layer: a fresh model outputs
        zeros), normal(0.02) for the pooled-caption and guidance MLPs like the timestep MLP, and the learned
        position table starting from the 2-D sin-cos table."""
        init_dit_weights_(self)
        nn.init.normal_(self.pooled_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.pooled_embedder.mlp[2].weight, std=0.02)
        if self.config.guidance_embed:
            nn.init.normal_(self.guidance_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.guidance_embedder.mlp[2].weight, std=0.02)
        for block in self.single_blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        if self.config.pos_embed == "learned":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(self.config.hidden_size, *self.config.grid_size).unsqueeze(0))

    def pos_embed_for(self, grid: Size2) -> Tensor:
        """Position table (1, gh·gw, D) for a patch grid. Learned: the parameter itself for the configured
        grid, else the table resized bilinearly (differentiable: the other sizes train the same table).
        ``"sincos_crop"``: the centre gh × gw crop of the fixed table (as SD3's ``cropped_pos_embed``)."""
        if self.config.pos_embed == "sincos_crop":
            size = self.config.pos_embed_max_size
            gh, gw = grid
            if gh > size or gw > size:
                raise ValueError(f"MMDiT: the patch grid {gh}×{gw} exceeds pos_embed_max_size {size}")
            top, left = (size - gh) // 2, (size - gw) // 2
            table = self.pos_embed.reshape(size, size, -1)[top:top + gh, left:left + gw]
            return table.reshape(1, gh * gw, -1)
        gh0, gw0 = self.config.grid_size
        if tuple(grid) == (gh0, gw0):
            return self.pos_embed
        D = self.config.hidden_size
        table = self.pos_embed.reshape(1, gh0, gw0, D).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=tuple(grid), mode="bilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def rope_table(self, grid: Size2, device: torch.device) -> Tensor:
        """RoPE table (gh·gw, head_dim/2, 2) float32 for the image tokens, cached per grid: 2-D axial, or with
        ``rope_axes_dims`` Flux's, for ids (0, …, 0, row, col) (row-major tokens)."""
        key = (tuple(grid), device)
        table = self._rope_cache.get(key)
        if table is None:
            axes = self.config.rope_axes_dims
            if axes is None:
                table = rope_freqs_2d(grid[0], grid[1], self.config.head_dim, self.config.rope_theta, device=device)
            else:
                rows, cols = torch.meshgrid(torch.arange(grid[0], device=device),
                                            torch.arange(grid[1], device=device), indexing="ij")
                ids = torch.zeros(grid[0] * grid[1], len(axes), dtype=torch.long, device=device)
                ids[:, -2], ids[:, -1] = rows.reshape(-1), cols.reshape(-1)
                table = rope_freqs(ids, axes, self.config.rope_theta)
            if not torch.compiler.is_compiling():  # eager-only cache; compiled code recomputes
                self._rope_cache[key] = table
        return table

    def _check_context(self, context: Tensor, batch: int) -> None:
        if not isinstance(context, Tensor) or context.dim() != 3:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"MMDiT: context must be caption tokens (B, L, caption_dim), got {shape}")
        if not context.is_floating_point():
            raise ValueError(f"MMDiT: context must be a floating-point tensor, got {context.dtype}")
        if context.shape[0] != batch or context.shape[2] != self.config.caption_dim or context.shape[1] < 1:
            raise ValueError(f"MMDiT: context must be (B, L, caption_dim) = ({batch}, L >= 1, "
                             f"{self.config.caption_dim}), got {tuple(context.shape)}")

    def _check_pooled(self, pooled: Optional[Tensor], batch: int) -> None:
        dim = self.config.pooled_dim
        if dim is None:
            if pooled is not None:
                raise ValueError("MMDiT: pooled given, but this model pools its caption tokens (config.pooled_dim "
                                 "is None); build it with pooled_dim to take a pooled vector")
            return
        if pooled is None:
            raise ValueError(f"MMDiT: this model takes a pooled caption vector: pass pooled=(B, {dim}) "
                             f"(config.pooled_dim={dim})")
        if not isinstance(pooled, Tensor) or not pooled.is_floating_point() or tuple(pooled.shape) != (batch, dim):
            what = (f"{tuple(pooled.shape)} {pooled.dtype}" if isinstance(pooled, Tensor)
                    else type(pooled).__name__)
            raise ValueError(f"MMDiT: pooled must be a float tensor (B, pooled_dim) = ({batch}, {dim}), got {what}")

    def _check_guidance(self, guidance: Optional[Tensor], batch: int) -> Optional[Tensor]:
        if not self.config.guidance_embed:
            if guidance is not None:
                raise ValueError("MMDiT: guidance given, but this model has no guidance embedding "
                                 "(config.guidance_embed=False)")
            return None
        if guidance is None:
            raise ValueError("MMDiT: this model embeds a guidance value (config.guidance_embed=True): pass "
                             "guidance=(B,) or a scalar tensor, in the units of t (Flux: 1000 × the guidance scale)")
        return check_timesteps(guidance, batch, "MMDiT (guidance)")

    def forward(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Optional[Tensor] = None, *,
                pooled: Optional[Tensor] = None, guidance: Optional[Tensor] = None) -> Tensor:
        grid = check_image(x, self.config.in_channels, self.config.patch_size, "MMDiT")
        B = x.shape[0]
        t = check_timesteps(t, B, "MMDiT")
        self._check_context(context, B)
        self._check_pooled(pooled, B)
        guidance = self._check_guidance(guidance, B)
        mask = caption_mask(context_mask, B, context.shape[1], context.device)

        if mask is not None:
            # Zeroed padding: whatever the padded positions hold (even NaN) cannot leak into the
            # output through 0-weighted attention values or the pooled sum.
            context = context.masked_fill(~mask.unsqueeze(-1), 0.0)
        if self.config.pooled_dim is None:
            if mask is not None:
                real = mask.unsqueeze(-1).to(context.dtype)
                pooled = context.sum(1) / real.sum(1).clamp(min=1.0)  # no real tokens: mean := 0
            else:
                pooled = context.mean(1)
        if self.trim_caption_padding and mask is not None and not torch.compiler.is_compiling() \
                and not (mask.is_cuda and torch.cuda.is_current_stream_capturing()):  # no sync in a graph
            context, mask = trim_caption_padding(context, mask)  # after the pooled mean: it is over real tokens

        img = self.x_embedder(x)
        if self.config.pos_embed == "rope":
            img_freqs = self.rope_table(grid, x.device)
        else:
            img = img + self.pos_embed_for(grid)
            img_freqs = None
        txt = self.context_embedder(context)
        c = self.t_embedder(t)
        if guidance is not None:
            c = c + self.guidance_embedder(guidance)
        c = c + self.pooled_embedder(pooled)
        # caption tokens carry no position: their RoPE (Flux's ids 0) is the identity, i.e. no table.
        # Residual carry through the joint blocks (see DiTBlock): each one's MLP residuals are added inside
        # the next one's first fused norms, the last image residual inside the final layer's norm.
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        pending = None
        for block in self.blocks:
            if checkpointed:
                img, txt, pending = checkpoint(block, img, txt, c, mask, img_freqs, None, pending, True,
                                               use_reentrant=False)
            else:
                img, txt, pending = block(img, txt, c, mask, img_freqs, None, pending, True)
        if self.single_blocks and pending is not None:
            img, txt = add_pending(img, pending[0]), add_pending(txt, pending[1])
            pending = None
        for block in self.single_blocks:
            if checkpointed:
                img, txt = checkpoint(block, img, txt, c, mask, img_freqs, None, use_reentrant=False)
            else:
                img, txt = block(img, txt, c, mask, img_freqs, None)
        out = self.final_layer(img, c, None if pending is None else pending[0])
        return unpatchify(out, grid, self.config.patch_size, self.config.out_channels)

    def trim_conditioning(self, cond: Optional[Dict], uncond: Optional[Dict] = None
                          ) -> Tuple[Optional[Dict], Optional[Dict]]:
        """The sampler's keyword arguments (``cond`` / ``uncond`` with ``context`` and ``context_mask``) with the
        caption positions that are padding in both cut off (:func:`trim_caption_padding`), once before a
        sampling loop: a compiled denoiser then runs on the shorter captions at every step. Either without a
        ``context_mask`` (all real) or without ``context`` is returned as given, and so is the other."""
        parts = [c for c in (cond, uncond) if c is not None]
        if not parts or any("context" not in c or c.get("context_mask") is None for c in parts):
            return cond, uncond
        masks = [caption_mask(c["context_mask"], c["context"].shape[0], c["context"].shape[1],
                              c["context"].device, "MMDiT.trim_conditioning") for c in parts]
        if len({m.shape[1] for m in masks}) != 1:
            return cond, uncond  # different lengths: the sampler reports that itself
        keep = caption_keep(torch.cat(masks))
        if keep == masks[0].shape[1]:
            return cond, uncond
        trimmed = iter([{**c, "context": c["context"][:, :keep], "context_mask": m[:, :keep]}
                        for c, m in zip(parts, masks)])
        return (None if cond is None else next(trimmed)), (None if uncond is None else next(trimmed))

    def flops_per_sample(self, height: Optional[int] = None, width: Optional[int] = None, *, caption_len: int,
                         training: bool = False) -> int:
        """FLOPs (2 × multiply-adds) of one sample's forward pass at ``height × width`` (latent pixels,
        default ``config.input_size``) with ``caption_len`` (padded) caption tokens; ``training=True``:
        forward + backward (3 × forward)."""
        flops = mmdit_flops(self.config, height, width, caption_len=caption_len)
        return int(training_flops(flops)) if training else flops

    def flop_breakdown(self, height: Optional[int] = None, width: Optional[int] = None, *,
                       caption_len: int) -> Dict[str, int]:
        """Forward FLOPs of one sample by part (see :func:`fastdit.models.flops.mmdit_flop_breakdown`)."""
        return mmdit_flop_breakdown(self.config, height, width, caption_len=caption_len)

    def extra_repr(self) -> str:
        return f"gradient_checkpointing={self.gradient_checkpointing}"
