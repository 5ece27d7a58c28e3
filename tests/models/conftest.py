"""Plain, independent re-implementations of the models the tests check fastdit's against:

- ``OfficialDiT``: the official DiT forward (Peebles & Xie; facebookresearch/DiT's models.py layout and
  keys) written out from the paper's description — numpy sin-cos table, ``[cos, sin]`` timestep
  frequencies, label table with a null row, AdaLN-Zero blocks, final AdaLN layer, einsum unpatchify;
- ``StockMMDiT``: an SD3-style MMDiT with fastdit's MMDiT keys, from stock PyTorch ops, with the last
  block's caption stream only giving keys and values (image queries over [caption, image] keys).

The stock DiT and joint blocks come from tests/modules/conftest.py (loaded by path: test directories
are not packages)."""
import importlib.util
import math
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _load_module_stock():
    path = pathlib.Path(__file__).resolve().parent.parent / "modules" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_fastdit_tests_stock_blocks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_stock = _load_module_stock()
StockDiTBlock, StockJointBlock, StockMlp, modulate = (_stock.StockDiTBlock, _stock.StockJointBlock, _stock.StockMlp,
                                                      _stock.modulate)
rotate_complex = _stock.rotate_complex


# ------------------------------------------------------------------------------------------ DiT

def official_1d_sincos(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def official_2d_sincos(dim, grid_h, grid_w):
    """MAE/DiT's get_2d_sincos_pos_embed, for an h × w grid: meshgrid puts w first, so the first half
    of the channels encodes the column."""
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)
    return np.concatenate([official_1d_sincos(dim // 2, grid[0]), official_1d_sincos(dim // 2, grid[1])], axis=1)


def official_timestep_embedding(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float64, device=t.device) / half)
    args = t[:, None].double() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class OfficialDiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        self.p, self.c_out, self.num_classes = patch_size, in_channels * (2 if learn_sigma else 1), num_classes
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)
        g = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.from_numpy(official_2d_sincos(hidden_size, g, g)).float().unsqueeze(0),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(StockDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden_size, patch_size * patch_size * self.c_out)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, t, y, force_drop_ids=None):
        B, _, H, W = x.shape
        h, w = H // self.p, W // self.p
        pos = self.pos_embed
        if h * w != pos.shape[1] or h != w:  # the official model has one (square) size; tests use others too
            pos = torch.from_numpy(official_2d_sincos(pos.shape[-1], h, w)).to(pos).unsqueeze(0)
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + pos
        t_emb = self.t_embedder.mlp(official_timestep_embedding(t).to(x.dtype))
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids == 1, self.num_classes, y)
        c = t_emb + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        x = x.reshape(B, h, w, self.p, self.p, self.c_out)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, self.c_out, h * self.p, w * self.p)


# ---------------------------------------------------------------------------------------- MMDiT

class StockPreOnlyAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv, self.proj, self.txt_kv = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.q_norm, self.k_norm, self.txt_k_norm = (nn.RMSNorm(self.hd, eps=1e-6) for _ in range(3))

    def forward(self, x, ctx, keep, img_freqs):
        B, N, _ = x.shape
        L = ctx.shape[1]
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if img_freqs is not None:
            q, k = rotate_complex(q, img_freqs), rotate_complex(k, img_freqs)
        kt, vt = self.txt_kv(ctx).reshape(B, L, 2, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        kt = self.txt_k_norm(kt)
        mask = torch.cat([keep, torch.ones(B, N, dtype=torch.bool, device=x.device)], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, torch.cat([kt, k], 2), torch.cat([vt, v], 2), attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class StockPreOnlyBlock(nn.Module):
    def __init__(self, d, heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = StockPreOnlyAttention(d, heads)
        self.mlp = StockMlp(d, int(d * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.txt_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, ctx, c, keep, img_freqs):
        m = self.adaLN_modulation(c).chunk(6, 1)
        t_shift, t_scale = self.txt_adaLN_modulation(c).chunk(2, 1)
        ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=1e-6)  # noqa: E731
        x = x + m[2].unsqueeze(1) * self.attn(modulate(ln(x), m[0], m[1]), modulate(ln(ctx), t_shift, t_scale), keep,
                                              img_freqs)
        return x + m[5].unsqueeze(1) * self.mlp(modulate(ln(x), m[3], m[4]))


def axial_rope_table(gh, gw, head_dim, theta=10000.0):
    """(gh·gw, head_dim/2, 2): the first head_dim/4 pairs rotate by the row, the rest by the column."""
    quarter = head_dim // 4
    omega = theta ** (-torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
    angles = torch.cat([rows[:, None] * omega, cols[:, None] * omega], dim=1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


class StockMMDiT(nn.Module):
    """Keys of fastdit's MMDiT; ``lengths`` (B,) marks real caption tokens."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, caption_dim,
                 pos_embed="rope", learn_sigma=False, mlp_ratio=4.0):
        super().__init__()
        d = hidden_size
        self.p, self.c_out, self.heads, self.rope = patch_size, in_channels * (1 + learn_sigma), num_heads, pos_embed
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, d, patch_size, stride=patch_size)
        self.context_embedder = nn.Linear(caption_dim, d)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.pooled_embedder = nn.Module()
        self.pooled_embedder.mlp = nn.Sequential(nn.Linear(caption_dim, d), nn.SiLU(), nn.Linear(d, d))
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, (input_size // patch_size) ** 2, d))
        self.blocks = nn.ModuleList([StockJointBlock(d, num_heads, mlp_ratio) for _ in range(depth - 1)]
                                    + [StockPreOnlyBlock(d, num_heads, mlp_ratio)])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(d, patch_size * patch_size * self.c_out)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, t, ctx, lengths):
        B, _, H, W = x.shape
        h, w = H // self.p, W // self.p
        keep = torch.arange(ctx.shape[1], device=x.device) < lengths[:, None]
        ctx = torch.where(keep[..., None], ctx, torch.zeros_like(ctx))
        pooled = torch.stack([ctx[i, :int(n)].mean(0) if n > 0 else torch.zeros_like(ctx[i, 0])
                              for i, n in enumerate(lengths)])
        img = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
        freqs = None
        if self.rope == "learned":
            img = img + self.pos_embed
        else:
            freqs = axial_rope_table(h, w, img.shape[-1] // self.heads)
        txt = self.context_embedder(ctx)
        c = self.t_embedder.mlp(official_timestep_embedding(t).to(x.dtype)) + self.pooled_embedder.mlp(pooled)
        for block in self.blocks[:-1]:
            img, txt = block(img, txt, c, lengths, freqs, None)
        img = self.blocks[-1](img, txt, c, keep, freqs)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        out = self.final_layer.linear(modulate(F.layer_norm(img, img.shape[-1:], eps=1e-6), shift, scale))
        out = out.reshape(B, h, w, self.p, self.p, self.c_out)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(B, self.c_out, H, W)


# ------------------------------------------------------------------------------------- helpers

def randomize_(module, std=0.1):
    """AdaLN-Zero starts every block as the identity and the output at 0: give every weight a random
    value to test anything (buffers such as DiT's fixed pos_embed stay)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def grads_by_name(model):
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture
def ref():
    """The independent reference models and helpers (importlib import mode: no `from conftest import`)."""
    return SimpleNamespace(OfficialDiT=OfficialDiT, official_2d_sincos=official_2d_sincos, StockMMDiT=StockMMDiT,
                           axial_rope_table=axial_rope_table, randomize_=randomize_, grads_by_name=grads_by_name)
