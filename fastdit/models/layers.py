"""Building blocks shared by the models: patch embedding and its inverse, the fixed 2-D sin-cos
position table, timestep / label / pooled-caption embedders, the final AdaLN layer, and the
initialisation of the official DiT.

Token order everywhere is row-major over the patch grid (the order of ``conv(x).flatten(2)``): token
``i * grid_w + j`` is the patch in row i, column j.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from fastdit.modules import AdaLNModulation, ModulatedLayerNorm

Size2 = Tuple[int, int]


def to_size2(size: Union[int, Sequence[int]], what: str = "size") -> Size2:
    """``32 -> (32, 32)``; ``(h, w)`` or ``[h, w]`` -> ``(h, w)``; anything else is a ValueError."""
    if isinstance(size, bool):
        raise ValueError(f"{what} must be an int or a pair (height, width), got {size!r}")
    if isinstance(size, int):
        pair = (size, size)
    else:
        try:
            pair = tuple(int(s) for s in size)
        except TypeError:
            raise ValueError(f"{what} must be an int or a pair (height, width), got {size!r}") from None
        if len(pair) != 2:
            raise ValueError(f"{what} must be an int or a pair (height, width), got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return pair


# ------------------------------------------------------------------------------------- input checks

def check_image(x: Tensor, channels: int, patch_size: int, who: str) -> Size2:
    """Validate a model input x: (B, C, H, W) with C = ``channels`` and H, W multiples of the patch
    size; returns the patch grid (H/p, W/p)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who}: x must be an image batch (B, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{who}: x must be a floating-point tensor, got {x.dtype}")
    B, C, H, W = x.shape
    if C != channels:
        raise ValueError(f"{who}: x has {C} channels, the model was built for in_channels={channels}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"{who}: input size {H}×{W} is not divisible by the patch size {patch_size}")
    return H // patch_size, W // patch_size


def check_timesteps(t: Tensor, batch: int, who: str) -> Tensor:
    """t: (B,) (or a scalar, used for the whole batch), float or integer -> (B,)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{who}: t must be a tensor of timesteps (B,), got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{who}: t must hold real timesteps (float or integer), got {t.dtype}")
    if t.dim() == 0:
        return t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{who}: t must be (B,) = ({batch},) or a scalar, got {tuple(t.shape)}")
    return t


# ------------------------------------------------------------------------------ fixed position table

def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """MAE/DiT 1-D sin-cos table: positions (M,) -> (M, dim) float64, ``[sin(p·ω), cos(p·ω)]`` with
    ``ω_k = 10000 ** (-k / (dim/2))``, k < dim/2."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, device: Optional[torch.device] = None) -> Tensor:
    """DiT's fixed 2-D sin-cos position table for a ``grid_h × grid_w`` patch grid, extended to
    non-square grids: (grid_h * grid_w, dim) float64, tokens in row-major order.

    As in DiT (from MAE), the first dim/2 channels encode the **column** index and the last dim/2 the
    **row** index (their meshgrid puts w first); on a square grid this is the official ``pos_embed``.
    ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


# --------------------------------------------------------------------------------- patchify and back

class PatchEmbed(nn.Module):
    """Non-overlapping p × p patches -> tokens: ``Conv2d(C, D, kernel=p, stride=p)`` then flatten.
    Key ``proj`` (as timm's ``PatchEmbed`` in DiT). x: (B, C, H, W) with H, W multiples of p ->
    (B, (H/p)·(W/p), D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(tokens: Tensor, grid: Size2, patch_size: int, channels: int) -> Tensor:
    """Inverse of patchify for the final layer's output: tokens (B, gh·gw, p·p·C) with features in
    (p_row, p_col, C) order (DiT's layout) -> image (B, C, gh·p, gw·p)."""
    B = tokens.shape[0]
    gh, gw = grid
    p = patch_size
    x = tokens.reshape(B, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, gh * p, gw * p)


# ------------------------------------------------------------------------------------- conditioning

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, dtype: Optional[torch.dtype] = None,
                       freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, DiT/ADM layout ``[cos, sin]``:
    t (B,) -> (B, dim), frequencies ``max_period ** (-k / (dim/2 - freq_shift))``, k < dim/2. Computed in
    ``dtype``, by default float32 (float64 when t is float64): the angles reach ~1000 rad, too large for
    half precision.

    ``freq_shift`` 0 is DiT/ADM; 1 is diffusers' ``Timesteps(dim, flip_sin_to_cos=True,
    downscale_freq_shift=1)`` (its DiT port), equal to it bit for bit in float32."""
    if dtype is None:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    # same operation order as diffusers' get_timestep_embedding (bitwise equal in float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / (half - freq_shift))
    angles = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) float timesteps in model units -> (B, hidden): sinusoidal embedding of size
    ``frequency_embedding_size`` then ``mlp = Linear, SiLU, Linear`` (keys ``mlp.0``, ``mlp.2``).
    ``freq_shift``: see :func:`timestep_embedding` (0 = DiT, 1 = diffusers' DiT port)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0,
                 freq_shift: float = 0.0):
        super().__init__()
        self.frequency_embedding_size, self.max_period = frequency_embedding_size, max_period
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t: Tensor) -> Tensor:
        weight_dtype = self.mlp[0].weight.dtype
        # float64 models (tests, references) embed in float64; everything else in float32
        dtype = torch.float64 if torch.float64 in (t.dtype, weight_dtype) else torch.float32
        emb = timestep_embedding(t, self.frequency_embedding_size, self.max_period, dtype, self.freq_shift)
        return self.mlp(emb.to(weight_dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, hidden), with classifier-free-guidance dropout (key ``embedding_table``).

    With ``dropout_prob > 0`` the table has ``num_classes + 1`` rows; row ``num_classes`` is the null
    class ("no label"). In training, each label is replaced by the null class with probability
    ``dropout_prob``; ``force_drop_ids`` (B,) (bool, or integers where 1 = drop, as in DiT) drops
    chosen labels in any mode. Without a null row, neither is possible.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)

    def drop_labels(self, labels: Tensor, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        """Labels with the dropped ones replaced by the null class: ``force_drop_ids`` if given,
        else a fresh Bernoulli(dropout_prob) draw per label."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1  # bool True == 1 too
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        if (train and self.has_null_class) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids)
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    """DiT's final layer: LayerNorm (no affine) + AdaLN shift/scale from c, then ``linear`` to
    p·p·C_out features per token. Keys ``adaLN_modulation.1``, ``linear`` (``norm_final`` has no state).
    x (B, N, D), c (B, D) -> (B, N, p·p·C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, backend: Optional[str] = None):
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 2)

    def forward(self, x: Tensor, c: Tensor, pending: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """``pending``: the last block's deferred MLP residual ``(y, gate)`` (DiTBlock's residual carry),
        added to x inside the fused norm."""
        shift, scale = self.adaLN_modulation(c)
        if pending is None:
            return self.linear(self.norm_final(x, shift, scale))
        _, h = self.norm_final.gated(x, pending[0], pending[1], shift, scale)
        return self.linear(h)


# ---------------------------------------------------------------------------------- initialisation

def init_dit_weights_(model: nn.Module) -> None:
    """The official DiT initialisation for the parts every model here shares: xavier-uniform weights
    and zero biases for every Linear; the patch-embedding kernel initialised like a Linear on its
    flattened (D, C·p·p) view; normal(0.02) for the timestep MLP; zero AdaLN modulation in every block
    and in the final layer, and a zero final linear, so that a fresh model outputs exactly 0.

    Expects ``x_embedder``, ``t_embedder``, ``blocks`` (each with ``adaLN_modulation``, and
    ``txt_adaLN_modulation`` for joint blocks) and ``final_layer``.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.x_embedder.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    zero = [model.final_layer.adaLN_modulation[1], model.final_layer.linear]
    for block in model.blocks:
        zero += [m[1] for m in block.children() if isinstance(m, AdaLNModulation)]
    for linear in zero:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
