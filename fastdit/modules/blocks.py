"""Transformer blocks: DiT's AdaLN-Zero block and the MMDiT double-stream (joint) block."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from fastdit.modules.attention import JointAttention
from fastdit.modules.norms import AdaLNModulation, ModulatedLayerNorm
from fastdit.ops.adaln import per_token


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``, with timm's keys ``fc1``, ``fc2`` (as in DiT)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """DiT block with AdaLN-Zero conditioning (Peebles & Xie 2023), state-dict compatible with the
    official ``DiTBlock`` (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``).

    ``forward(x, c, freqs=None)``: x (B, N, dim) tokens, c (B, dim) conditioning (timestep + label),
    freqs an optional RoPE table for the tokens. The LayerNorm+modulate before attention and the
    gated residual + LayerNorm+modulate between attention and MLP are single fused ops.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = False,
                 rope_interleaved: bool = True, mlp_norm_eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.attn = JointAttention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm,
                                   rope_interleaved=rope_interleaved, backend=backend)
        # mlp_norm_eps: the MLP-side LayerNorm's eps (diffusers' DiT port uses its norm_eps, 1e-5, there)
        self.norm2 = ModulatedLayerNorm(hidden_size, eps=mlp_norm_eps, backend=backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6)

    def forward(self, x: Tensor, c: Tensor, freqs: Optional[Tensor] = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)
        attn_out, _ = self.attn(self.norm1(x, shift_msa, scale_msa), img_freqs=freqs)
        x, h = self.norm2.gated(x, attn_out, gate_msa, shift_mlp, scale_mlp)
        return x + per_token(gate_mlp) * self.mlp(h)


class JointDiTBlock(nn.Module):
    """MMDiT double-stream block (SD3/Flux): image and caption streams with their own modulation,
    norms and MLPs, and one joint attention over both.

    Keys: the image stream uses DiT's names (``norm1``, ``attn``, ``norm2``, ``mlp``, ``adaLN_modulation``);
    the caption stream prefixes them with ``txt_`` (``txt_mlp``, ``txt_adaLN_modulation``; its attention
    weights live in ``attn.txt_*``).

    ``forward(x, context, c, txt_mask=None, img_freqs=None, txt_freqs=None) -> (x, context)``:
    x (B, N_img, dim), context (B, N_txt, dim), c (B, dim); txt_mask bool (B, N_txt) or lengths (B,).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = True,
                 rope_interleaved: bool = True, backend: Optional[str] = None):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.txt_norm1 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.attn = JointAttention(hidden_size, num_heads, joint=True, qkv_bias=True, qk_norm=qk_norm,
                                   rope_interleaved=rope_interleaved, backend=backend)
        self.norm2 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.txt_norm2 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.mlp = Mlp(hidden_size, mlp_hidden)
        self.txt_mlp = Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6)
        self.txt_adaLN_modulation = AdaLNModulation(hidden_size, 6)

    def forward(self, x: Tensor, context: Tensor, c: Tensor, txt_mask: Optional[Tensor] = None,
                img_freqs: Optional[Tensor] = None, txt_freqs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.adaLN_modulation(c)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_adaLN_modulation(c)
        attn_x, attn_c = self.attn(self.norm1(x, i_shift1, i_scale1), self.txt_norm1(context, t_shift1, t_scale1),
                                   txt_mask, img_freqs, txt_freqs)
        x, h = self.norm2.gated(x, attn_x, i_gate1, i_shift2, i_scale2)
        context, hc = self.txt_norm2.gated(context, attn_c, t_gate1, t_shift2, t_scale2)
        return x + per_token(i_gate2) * self.mlp(h), context + per_token(t_gate2) * self.txt_mlp(hc)
