"""The stock-PyTorch peers of the training-step benchmarks: the DiT-XL/2 and the Flux-style double
blocks that ``../shared/baselines/stock_pytorch_baseline.py`` measured (its figures are the targets'
denominators), rebuilt here so that fastdit is timed against them in the same process.

Architecture, precision and loss are the baseline's: fp32 weights under bf16 autocast, SDPA attention,
LayerNorm + (1 + scale) / shift modulation, tanh-GELU MLP, no learned sigma, MSE on float32 outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class StockMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class StockDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.mlp = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), StockMlp(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, -1)
        B, N, D = x.shape
        q, k, v = self.qkv(modulate(x, shift1, scale1)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + gate1[:, None] * self.proj(attn)
        return x + gate2[:, None] * self.mlp(modulate(x, shift2, scale2))


class StockDiT(nn.Module):
    """DiT-XL/2 defaults (28 blocks, width 1152, 16 heads, patch 2 on 4×32×32 latents, 1000 classes)."""

    def __init__(self, depth=28, dim=1152, heads=16, patch=2, in_channels=4, latent=32, num_classes=1000):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (latent // patch) ** 2, dim))
        self.t_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.labels = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(StockDiTBlock(dim, heads) for _ in range(depth))
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch * patch * in_channels)

    def forward(self, x, t, y):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        t_emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
        c = self.t_mlp(t_emb) + self.labels(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(c).chunk(2, -1)
        return self.out(modulate(x, shift, scale))  # (B, N, p·p·C): the loss compares tokens


class StockJointBlock(nn.Module):
    """SD3/Flux-style double-stream block: per-stream weights, QK RMSNorm, RoPE on every token, one SDPA
    over [caption, image]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv_x, self.qkv_c = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.proj_x, self.proj_c = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp_x, self.mlp_c = StockMlp(dim), StockMlp(dim)
        self.ada_x = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.ada_c = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6), nn.RMSNorm(dim // heads, eps=1e-6)

    def forward(self, x, c, t, cos, sin):
        B, Nx, D = x.shape
        Nc = c.shape[1]
        mx, mc = self.ada_x(t).chunk(6, -1), self.ada_c(t).chunk(6, -1)
        qkv_x = self.qkv_x(modulate(x, mx[0], mx[1])).view(B, Nx, 3, self.heads, D // self.heads)
        qkv_c = self.qkv_c(modulate(c, mc[0], mc[1])).view(B, Nc, 3, self.heads, D // self.heads)
        qkv = torch.cat([qkv_c, qkv_x], 1).permute(2, 0, 3, 1, 4)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]

        def rotate(z):
            z1, z2 = z.float().unflatten(-1, (-1, 2)).unbind(-1)
            cc, ss = cos[..., ::2], sin[..., ::2]
            return torch.stack([z1 * cc - z2 * ss, z1 * ss + z2 * cc], -1).flatten(-2).type_as(z)

        q, k = rotate(q), rotate(k)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Nc + Nx, D)
        attn_c, attn_x = attn[:, :Nc], attn[:, Nc:]
        x = x + mx[2][:, None] * self.proj_x(attn_x)
        x = x + mx[5][:, None] * self.mlp_x(modulate(x, mx[3], mx[4]))
        c = c + mc[2][:, None] * self.proj_c(attn_c)
        c = c + mc[5][:, None] * self.mlp_c(modulate(c, mc[3], mc[4]))
        return x, c


class StockJointStack(nn.Module):
    """``depth`` double blocks then a linear head on the image tokens (the baseline's 8-block "MMDiT")."""

    def __init__(self, depth=8, dim=3072, heads=24, out_features=64):
        super().__init__()
        self.blocks = nn.ModuleList(StockJointBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, out_features)

    def forward(self, x, c, t, cos, sin):
        for block in self.blocks:
            x, c = block(x, c, t, cos, sin)
        return self.out(x)
