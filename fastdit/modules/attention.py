"""JointAttention: per-stream QKV/output projections, optional QK-norm and RoPE, one joint attention."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastdit.modules.norms import RMSNorm
from fastdit.ops.attention import _key_mask, joint_attention_qk


class JointAttention(nn.Module):
    """Multi-head attention over image tokens and, when ``joint=True``, caption tokens too (MMDiT).

    Each stream has its own QKV and output projections (and QK-norm weights); queries of both streams
    attend over the keys of both. With ``joint=False`` it is DiT's (timm's) self-attention, with the
    same state-dict keys: ``qkv``, ``proj`` (+ ``q_norm.weight``, ``k_norm.weight`` with ``qk_norm``);
    the text stream adds ``txt_qkv``, ``txt_proj`` (+ ``txt_q_norm``, ``txt_k_norm``).

    ``forward(x, context=None, txt_mask=None, img_freqs=None, txt_freqs=None)``:
    x: (B, N_img, dim); context: (B, N_txt, dim) caption tokens (already at model width);
    txt_mask: bool (B, N_txt) or lengths (B,) of real caption tokens; img_freqs / txt_freqs: RoPE
    tables for each stream ((N, head_dim/2, 2), see :class:`RotaryEmbedding`), None = no rotation.
    Returns ``(x_out, context_out)``; context_out is None without a text stream. ``x_fp8`` /
    ``context_fp8``: the stream's input already quantised per row (FP8 mode: the projections are
    :class:`~fastdit.modules.fp8.Fp8Linear`), passed to the QKV projection instead of quantising it again.

    Padded caption tokens influence nothing, whatever they hold (NaN and inf included): their context rows
    are selected away (``torch.where``) before the projection, so that even the weight gradients stay
    finite, and the attention ignores them (see :mod:`fastdit.ops.attention`). Their rows of context_out
    are ``txt_proj(0)``, its bias.
    """

    def __init__(self, dim: int, num_heads: int, *, joint: bool = False, qkv_bias: bool = True,
                 qk_norm: bool = False, rope_interleaved: bool = True, eps: float = 1e-6,
                 backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"JointAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.joint, self.qk_norm, self.rope_interleaved, self.backend = joint, qk_norm, rope_interleaved, backend
        self.eps = eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps, backend)
            self.k_norm = RMSNorm(self.head_dim, eps, backend)
        if joint:
            self.txt_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.txt_proj = nn.Linear(dim, dim)
            if qk_norm:
                self.txt_q_norm = RMSNorm(self.head_dim, eps, backend)
                self.txt_k_norm = RMSNorm(self.head_dim, eps, backend)

    def _qkv(self, x: Tensor, qkv: nn.Linear, x_fp8: Optional[Tuple[Tensor, Tensor]] = None
             ) -> Tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        # x_fp8: x already quantised per row by the norm before (FP8 mode, fastdit.modules.fp8)
        # (an FP8 block may keep a layer that _scaled_mm cannot take in bf16: it quantises nothing)
        out = qkv(x, x_fp8=x_fp8) if x_fp8 is not None and getattr(qkv, "takes_fp8_input", False) else qkv(x)
        # Feature order of the projection is (3, heads, head_dim), as in DiT/timm and Flux.
        return out.view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d) views

    @staticmethod
    def _weight(norm: Optional[RMSNorm]) -> Optional[Tensor]:
        return None if norm is None else norm.weight

    def forward(self, x: Tensor, context: Optional[Tensor] = None, txt_mask: Optional[Tensor] = None,
                img_freqs: Optional[Tensor] = None, txt_freqs: Optional[Tensor] = None,
                x_fp8: Optional[Tuple[Tensor, Tensor]] = None, context_fp8: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"JointAttention: x must be (B, N, {self.dim}), got {tuple(x.shape)}")
        if context is not None and not self.joint:
            raise ValueError("JointAttention: context given, but the module was built with joint=False "
                             "(no text-stream weights)")
        q, k, v = self._qkv(x, self.qkv, x_fp8)
        qt = kt = vt = None
        if context is not None:
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.dim:
                raise ValueError(f"JointAttention: context must be (B, N_txt, {self.dim}) with B = {x.shape[0]}, "
                                 f"got {tuple(context.shape)}")
            if txt_mask is not None:  # padded tokens as zeros: 0 · NaN in the projection's weight gradient is NaN
                real = _key_mask(txt_mask, context.shape[0], context.shape[1])
                context = torch.where(real[:, :, None], context, 0.0)
                context_fp8 = None  # quantised before the selection: the projection quantises what it gets
            qt, kt, vt = self._qkv(context, self.txt_qkv, context_fp8)
        # QK-norm and RoPE of both streams and the joint attention: one op (fused into the attention
        # kernel on the fast path; qk_norm_rope then SDPA on the reference path)
        o_img, o_txt = joint_attention_qk(
            q, k, v, qt, kt, vt, txt_mask, q_weight=self._weight(getattr(self, "q_norm", None)),
            k_weight=self._weight(getattr(self, "k_norm", None)),
            txt_q_weight=self._weight(getattr(self, "txt_q_norm", None)) if qt is not None else None,
            txt_k_weight=self._weight(getattr(self, "txt_k_norm", None)) if qt is not None else None,
            img_freqs=img_freqs, txt_freqs=txt_freqs if qt is not None else None, eps=self.eps,
            interleaved=self.rope_interleaved, backend=self.backend)
        x_out = self.proj(o_img.reshape(x.shape))
        c_out = None if o_txt is None else self.txt_proj(o_txt.reshape(context.shape))
        return x_out, c_out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, joint={self.joint}, qk_norm={self.qk_norm}, "
                f"backend={self.backend!r}")
