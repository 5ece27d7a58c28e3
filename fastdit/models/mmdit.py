"""MMDiT: a caption-conditional latent DiT with symmetric joint attention (SD3-like), built from
fastdit's :class:`~fastdit.modules.JointDiTBlock`.

    model = MMDiT.from_name("MMDiT-S/2", caption_dim=384)
    out = model(x, t, context, context_mask)     # x (B, 4, H, W), t (B,), context (B, L, 384), lengths (B,)

Image tokens come from a Conv2d patchify, with a learned position table or 2-D axial RoPE; caption
tokens (B, L, caption_dim) are projected to the model width and carry no position. The conditioning
vector is ``c = MLP_t(Emb(t)) + MLP_c(mean of the real caption tokens)``. Each joint block has separate
weights per stream and one attention over both; the last block is context-pre-only (as in SD3): its
caption stream only supplies keys and values, since nothing reads the caption stream after it.
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
                                   init_dit_weights_, sincos_2d, unpatchify)
from fastdit.modules import AdaLNModulation, JointAttention, JointDiTBlock, Mlp, ModulatedLayerNorm, RMSNorm
from fastdit.ops.adaln import per_token
from fastdit.ops.attention import joint_attention
from fastdit.ops.qk_norm_rotary import qk_norm_rope
from fastdit.ops.rmsnorm import rms_norm
from fastdit.ops.rotary import rope_freqs_2d

# (depth, hidden size, heads): DiT's sizes, plus a tiny one for tests and demos
MMDIT_SIZES = {"Tiny": (2, 128, 2), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
               "XL": (28, 1152, 16)}
POS_EMBED_KINDS = ("rope", "learned")


@dataclasses.dataclass
class MMDiTConfig(PatchModelConfig):
    """Architecture of an MMDiT.

    input_size: the latent size (int or (height, width)) the learned position table is built for
    (other sizes interpolate it; RoPE tables are computed for any size). caption_dim: width of the
    caption encoder's tokens (384 for all-MiniLM-L6-v2). pos_embed: ``"rope"`` (2-D axial RoPE on the
    image tokens' queries and keys; head dim divisible by 4) or ``"learned"`` (a table added to the
    image tokens). learn_sigma: output 2 × in_channels channels. depth counts every block, the last
    (context-pre-only) one included.
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

    family = "MMDiT"
    PRESETS = {f"MMDiT-{size}/{p}": {"depth": d, "hidden_size": h, "num_heads": n, "patch_size": p}
               for size, (d, h, n) in MMDIT_SIZES.items() for p in (2, 4, 8)}

    def __post_init__(self):
        self._validate_common(extra_ints=("caption_dim",))
        if self.pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"MMDiTConfig.pos_embed must be one of {', '.join(POS_EMBED_KINDS)}, "
                             f"got {self.pos_embed!r}")
        if self.pos_embed == "rope" and self.head_dim % 4:
            raise ValueError(f"MMDiTConfig: 2-D RoPE needs a head dim divisible by 4, got {self.head_dim}")
        if self.pos_embed == "learned" and self.hidden_size % 4:
            raise ValueError(f"MMDiTConfig: the learned table starts from 2-D sin-cos and needs hidden_size "
                             f"divisible by 4, got {self.hidden_size}")


class PooledCaptionEmbedder(nn.Module):
    """Mean caption features (B, caption_dim) -> (B, hidden): ``mlp = Linear, SiLU, Linear``."""

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
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6)
        self.txt_adaLN_modulation = AdaLNModulation(hidden_size, 2)

    def forward(self, x: Tensor, context: Tensor, c: Tensor, txt_mask: Optional[Tensor] = None,
                img_freqs: Optional[Tensor] = None, txt_freqs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)
        t_shift, t_scale = self.txt_adaLN_modulation(c)
        attn_x, _ = self.attn(self.norm1(x, shift1, scale1), self.txt_norm1(context, t_shift, t_scale),
                              txt_mask, img_freqs, txt_freqs)
        x, h = self.norm2.gated(x, attn_x, gate1, shift2, scale2)
        return x + per_token(gate2) * self.mlp(h), context


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


class MMDiT(nn.Module):
    """Caption-conditional latent DiT with symmetric joint attention (SD3-like).

    ``forward(x, t, context, context_mask=None) -> (B, C_out, H, W)``:

    - x: (B, in_channels, H, W) latents, H and W multiples of the patch size, any aspect ratio;
    - t: (B,) timesteps in model units (e.g. rectified-flow t·1000), or a scalar;
    - context: (B, L, caption_dim) caption tokens (L ≥ 1; any padded length);
    - context_mask: which caption tokens are real, bool (B, L) or lengths (B,); None = all real.
      Padded tokens take no part: they are zeroed before the projections, masked out as attention keys,
      and left out of the pooled mean. A sample with no real tokens gets a pooled mean of 0 and its image
      tokens attend over the image only.

    Keys: ``x_embedder.proj``, ``pos_embed`` (learned variant: (1, N, D) parameter),
    ``context_embedder``, ``t_embedder.mlp``, ``pooled_embedder.mlp``, ``blocks.{i}.*`` (JointDiTBlock's
    keys; the last block has ``attn.txt_kv`` and a 2-chunk ``txt_adaLN_modulation``), ``final_layer``.

    ``backend`` goes to every fastdit module; ``gradient_checkpointing = True`` recomputes each block
    in backward.
    """

    def __init__(self, config: Optional[MMDiTConfig] = None, *, backend: Optional[str] = None):
        super().__init__()
        self.config = config = config if config is not None else MMDiTConfig()
        if not isinstance(config, MMDiTConfig):
            raise ValueError(f"MMDiT needs an MMDiTConfig, got {type(config).__name__}")
        D = config.hidden_size
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.context_embedder = nn.Linear(config.caption_dim, D)
        self.t_embedder = TimestepEmbedder(D, config.frequency_embedding_size)
        self.pooled_embedder = PooledCaptionEmbedder(config.caption_dim, D)
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size[0] * config.grid_size[1], D))
        block_args = dict(mlp_ratio=config.mlp_ratio, qk_norm=config.qk_norm, backend=backend)
        blocks = [JointDiTBlock(D, config.num_heads, **block_args) for _ in range(config.depth - 1)]
        self.blocks = nn.ModuleList(blocks + [ContextPreOnlyJointBlock(D, config.num_heads, **block_args)])
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels, backend=backend)
        self._rope_cache: Dict[tuple, Tensor] = {}
        self.initialize_weights()

    @classmethod
    def from_name(cls, name: str, *, backend: Optional[str] = None, **overrides) -> "MMDiT":
        """A model of the named preset (``MMDiTConfig.names()``), fields overridable by keyword."""
        return cls(MMDiTConfig.from_name(name, **overrides), backend=backend)

    def initialize_weights(self) -> None:
        """DiT's initialisation (xavier linears, zero AdaLN and final layer: a fresh model outputs
        zeros), normal(0.02) for the pooled-caption MLP like the timestep MLP, and the learned position
        table starting from the 2-D sin-cos table."""
        init_dit_weights_(self)
        nn.init.normal_(self.pooled_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.pooled_embedder.mlp[2].weight, std=0.02)
        if self.config.pos_embed == "learned":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(self.config.hidden_size, *self.config.grid_size).unsqueeze(0))

    def pos_embed_for(self, grid: Size2) -> Tensor:
        """Learned position table (1, gh·gw, D) for a patch grid: the parameter itself for the configured
        grid, else the table resized bilinearly (differentiable: the other sizes train the same table)."""
        gh0, gw0 = self.config.grid_size
        if tuple(grid) == (gh0, gw0):
            return self.pos_embed
        D = self.config.hidden_size
        table = self.pos_embed.reshape(1, gh0, gw0, D).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=tuple(grid), mode="bilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def rope_table(self, grid: Size2, device: torch.device) -> Tensor:
        """2-D axial RoPE table (gh·gw, head_dim/2, 2) float32 for the image tokens, cached per grid."""
        key = (tuple(grid), device)
        table = self._rope_cache.get(key)
        if table is None:
            table = rope_freqs_2d(grid[0], grid[1], self.config.head_dim, self.config.rope_theta, device=device)
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

    def forward(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Optional[Tensor] = None) -> Tensor:
        grid = check_image(x, self.config.in_channels, self.config.patch_size, "MMDiT")
        B = x.shape[0]
        t = check_timesteps(t, B, "MMDiT")
        self._check_context(context, B)
        mask = caption_mask(context_mask, B, context.shape[1], context.device)

        if mask is not None:
            # Zeroed padding: whatever the padded positions hold (even NaN) cannot leak into the
            # output through 0-weighted attention values or the pooled sum.
            context = context.masked_fill(~mask.unsqueeze(-1), 0.0)
            real = mask.unsqueeze(-1).to(context.dtype)
            pooled = context.sum(1) / real.sum(1).clamp(min=1.0)  # no real tokens: mean := 0
        else:
            pooled = context.mean(1)

        img = self.x_embedder(x)
        if self.config.pos_embed == "learned":
            img = img + self.pos_embed_for(grid)
            img_freqs = None
        else:
            img_freqs = self.rope_table(grid, x.device)
        txt = self.context_embedder(context)
        c = self.t_embedder(t) + self.pooled_embedder(pooled)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                img, txt = checkpoint(block, img, txt, c, mask, img_freqs, None, use_reentrant=False)
            else:
                img, txt = block(img, txt, c, mask, img_freqs, None)
        out = self.final_layer(img, c)
        return unpatchify(out, grid, self.config.patch_size, self.config.out_channels)

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
