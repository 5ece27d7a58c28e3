"""Transformer blocks: DiT's AdaLN-Zero block, the MMDiT double-stream (joint) block and Flux's
single-stream block."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastdit.backend import resolve_backend
from fastdit.modules.attention import JointAttention
from fastdit.modules.norms import AdaLNModulation, ModulatedLayerNorm, RMSNorm
from fastdit.ops._common import needs_grad
from fastdit.ops.adaln import per_token
from fastdit.ops.attention import _key_mask, joint_attention_qk
from fastdit.ops.linear_gelu import linear_gelu


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))``, with timm's keys ``fc1``, ``fc2`` (as in DiT).

    With ``backend="triton"``, where no gradient is needed on CUDA (inference, sampling), fc1 and the GELU are
    one GEMM with cuBLASLt's GELU epilogue (:func:`fastdit.ops.linear_gelu`). ``"auto"`` keeps the stock pair
    until the epilogue's end-to-end effect has been measured on a GPU (its GPU tests are written but their
    first run reported no result)."""

    def __init__(self, dim: int, hidden_dim: int, backend: Optional[str] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.backend = backend

    def forward(self, x: Tensor, x_fp8: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """x (..., dim); ``x_fp8``: x already quantised per row, for an FP8 ``fc1`` (fastdit.modules.fp8)."""
        if x_fp8 is not None:  # (fc1 may have been kept in bf16 by enable_fp8: a size _scaled_mm cannot take)
            h = self.fc1(x, x_fp8=x_fp8) if getattr(self.fc1, "takes_fp8_input", False) else self.fc1(x)
            return self.fc2(self.act(h))
        if x.is_cuda and not needs_grad(x, self.fc1.weight, self.fc1.bias) and \
                resolve_backend(self.backend) == "triton":
            return self.fc2(linear_gelu(x, self.fc1.weight, self.fc1.bias, backend=self.backend))
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """DiT block with AdaLN-Zero conditioning (Peebles & Xie 2023), state-dict compatible with the
    official ``DiTBlock`` (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``).

    ``forward(x, c, freqs=None)``: x (B, N, dim) tokens, c (B, dim) conditioning (timestep + label),
    freqs an optional RoPE table for the tokens. The LayerNorm+modulate before attention and the
    gated residual + LayerNorm+modulate between attention and MLP are single fused ops.

    Residual carry (what :class:`~fastdit.models.DiT` does between its blocks): with ``defer_residual=True``
    the block returns ``(x, (y, gate))`` instead of ``x + gate * y`` for its MLP branch, and the next block
    takes that pair as ``pending``, adding it inside its first fused op (``norm1.gated``). The residual
    stream is then read and written once per block boundary instead of twice (the standalone
    ``x + gate * y`` kernel, 28 per DiT-XL/2 forward, disappears). The math is the same; the sum is taken in
    float32 without first rounding ``gate * y`` to y's dtype.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = False,
                 rope_interleaved: bool = True, mlp_norm_eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.attn = JointAttention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm,
                                   rope_interleaved=rope_interleaved, backend=backend)
        # mlp_norm_eps: the MLP-side LayerNorm's eps (diffusers' DiT port uses its norm_eps, 1e-5, there)
        self.norm2 = ModulatedLayerNorm(hidden_size, eps=mlp_norm_eps, backend=backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), backend=backend)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6)
        self.fp8_inputs = False  # set by fastdit.modules.fp8.enable_fp8 (its Linear layers are then FP8)

    def forward(self, x: Tensor, c: Tensor, freqs: Optional[Tensor] = None,
                pending: Optional[Tuple[Tensor, Tensor]] = None, defer_residual: bool = False):
        """x (B, N, dim), c (B, dim); ``pending``: the previous block's deferred ``(y, gate)``, added to x
        first. Returns x, or ``(x, (y, gate))`` with ``defer_residual`` (see the class docstring)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)
        if self.fp8_inputs:  # FP8 mode: the norms also emit their output quantised for qkv / fc1
            x, h, h_q = modulated_input_fp8(self.norm1, x, pending, shift_msa, scale_msa)
            attn_out, _ = self.attn(h, img_freqs=freqs, x_fp8=h_q)
            x, h, *h_q = self.norm2.gated_fp8(x, attn_out, gate_msa, shift_mlp, scale_mlp)
            y = self.mlp(h, x_fp8=tuple(h_q))
        else:
            x, h = modulated_input(self.norm1, x, pending, shift_msa, scale_msa)
            attn_out, _ = self.attn(h, img_freqs=freqs)
            x, h = self.norm2.gated(x, attn_out, gate_msa, shift_mlp, scale_mlp)
            y = self.mlp(h)
        if defer_residual:
            return x, (y, gate_mlp)
        return x + per_token(gate_mlp) * y


class JointDiTBlock(nn.Module):
    """MMDiT double-stream block (SD3/Flux): image and caption streams with their own modulation,
    norms and MLPs, and one joint attention over both.

    Keys: the image stream uses DiT's names (``norm1``, ``attn``, ``norm2``, ``mlp``, ``adaLN_modulation``);
    the caption stream prefixes them with ``txt_`` (``txt_mlp``, ``txt_adaLN_modulation``; its attention
    weights live in ``attn.txt_*``).

    ``forward(x, context, c, txt_mask=None, img_freqs=None, txt_freqs=None) -> (x, context)``:
    x (B, N_img, dim), context (B, N_txt, dim), c (B, dim); txt_mask bool (B, N_txt) or lengths (B,).
    ``pending`` / ``defer_residual``: the residual carry of :class:`DiTBlock`, per stream: ``pending`` is
    ``((y_img, gate_img), (y_txt, gate_txt))`` (an entry may be None), and with ``defer_residual`` the block
    returns ``(x, context, pending)`` with its own MLP residuals deferred.
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
        self.mlp = Mlp(hidden_size, mlp_hidden, backend=backend)
        self.txt_mlp = Mlp(hidden_size, mlp_hidden, backend=backend)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6)
        self.txt_adaLN_modulation = AdaLNModulation(hidden_size, 6)
        self.fp8_inputs = False  # set by fastdit.modules.fp8.enable_fp8

    def forward(self, x: Tensor, context: Tensor, c: Tensor, txt_mask: Optional[Tensor] = None,
                img_freqs: Optional[Tensor] = None, txt_freqs: Optional[Tensor] = None,
                pending: Optional[Tuple] = None, defer_residual: bool = False):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.adaLN_modulation(c)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_adaLN_modulation(c)
        img_pending, txt_pending = pending if pending is not None else (None, None)
        if self.fp8_inputs:  # FP8 mode (fastdit.modules.fp8): the norms also emit e4m3 rows for qkv / fc1
            x, h, h_q = modulated_input_fp8(self.norm1, x, img_pending, i_shift1, i_scale1)
            context, hc, hc_q = modulated_input_fp8(self.txt_norm1, context, txt_pending, t_shift1, t_scale1)
            attn_x, attn_c = self.attn(h, hc, txt_mask, img_freqs, txt_freqs, x_fp8=h_q, context_fp8=hc_q)
            x, h, *h_q = self.norm2.gated_fp8(x, attn_x, i_gate1, i_shift2, i_scale2)
            context, hc, *hc_q = self.txt_norm2.gated_fp8(context, attn_c, t_gate1, t_shift2, t_scale2)
            y, yc = self.mlp(h, x_fp8=tuple(h_q)), self.txt_mlp(hc, x_fp8=tuple(hc_q))
        else:
            x, h = modulated_input(self.norm1, x, img_pending, i_shift1, i_scale1)
            context, hc = modulated_input(self.txt_norm1, context, txt_pending, t_shift1, t_scale1)
            attn_x, attn_c = self.attn(h, hc, txt_mask, img_freqs, txt_freqs)
            x, h = self.norm2.gated(x, attn_x, i_gate1, i_shift2, i_scale2)
            context, hc = self.txt_norm2.gated(context, attn_c, t_gate1, t_shift2, t_scale2)
            y, yc = self.mlp(h), self.txt_mlp(hc)
        if defer_residual:
            return x, context, ((y, i_gate2), (yc, t_gate2))
        return x + per_token(i_gate2) * y, context + per_token(t_gate2) * yc


def modulated_input(norm: ModulatedLayerNorm, x: Tensor, pending: Optional[Tuple[Tensor, Tensor]], shift: Tensor,
                    scale: Tensor) -> Tuple[Tensor, Tensor]:
    """``(x, norm(x))``, or with a deferred residual ``(y, gate)``: ``(x + gate*y, norm(x + gate*y))`` in one
    fused op (the residual carry)."""
    if pending is None:
        return x, norm(x, shift, scale)
    return norm.gated(x, pending[0], pending[1], shift, scale)


def modulated_input_fp8(norm: ModulatedLayerNorm, x: Tensor, pending: Optional[Tuple[Tensor, Tensor]],
                        shift: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor, Tuple[Tensor, Tensor]]:
    """:func:`modulated_input` that also returns the normalised input quantised per row for an FP8 GEMM:
    ``(x, h, (h_q, h_scale))``."""
    if pending is None:
        h, h_q, h_scale = norm.fp8(x, shift, scale)
        return x, h, (h_q, h_scale)
    x, h, h_q, h_scale = norm.gated_fp8(x, pending[0], pending[1], shift, scale)
    return x, h, (h_q, h_scale)


def add_pending(x: Tensor, pending: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
    """``x + gate*y`` for a deferred residual ``(y, gate)`` (where no fused op follows to take it)."""
    return x if pending is None else x + per_token(pending[1]) * pending[0]


class SingleStreamDiTBlock(nn.Module):
    """Flux's single-stream block (BFL's ``SingleStreamBlock``): attention and MLP in parallel, from one
    modulated input, with one set of weights for image and caption tokens alike.

    ``h = LN(x)·(1 + scale) + shift``; ``linear1(h)`` gives q, k, v (features in (3, heads, head_dim) order,
    as :class:`~fastdit.modules.JointAttention`) and the MLP input; q and k get RMSNorm (``q_norm``,
    ``k_norm``) and RoPE; one joint attention over both streams; then
    ``x + gate · linear2(cat[attn_out, GELU_tanh(mlp_in)])``. Modulation ``adaLN_modulation`` (3 chunks:
    shift, scale, gate). Keys: ``linear1``, ``linear2``, ``q_norm.weight``, ``k_norm.weight`` (with
    ``qk_norm``), ``adaLN_modulation.1``.

    ``forward(x, context, c, txt_mask=None, img_freqs=None, txt_freqs=None) -> (x, context)``, as
    :class:`JointDiTBlock`: x (B, N_img, dim), context (B, N_txt, dim), c (B, dim); txt_mask bool
    (B, N_txt) or lengths (B,); img_freqs / txt_freqs: RoPE tables per stream ((N, head_dim/2, 2) or
    (B, N, head_dim/2, 2)), None = no rotation (Flux's caption ids are 0: the identity, i.e. None).

    Padded caption tokens take no part, whatever they hold (NaN included): their rows are selected to zero
    before the LayerNorm and the projection (so every gradient stays finite), the attention ignores them
    as keys, and their rows of the returned context are the input rows, unchanged (the gradient there
    passes straight through). QK-norm, RoPE and the attention are one :func:`fastdit.ops.joint_attention_qk`
    call with the module's ``backend`` (the fused Triton kernel under ``auto``/``triton``).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = True,
                 rope_interleaved: bool = True, eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"SingleStreamDiTBlock: hidden_size {hidden_size} is not divisible by num_heads "
                             f"{num_heads}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.qk_norm, self.rope_interleaved, self.eps, self.backend = qk_norm, rope_interleaved, eps, backend
        self.norm = ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps, backend)
            self.k_norm = RMSNorm(self.head_dim, eps, backend)
        self.act = nn.GELU(approximate="tanh")
        self.adaLN_modulation = AdaLNModulation(hidden_size, 3)

    def _project(self, h: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        B, N, D = h.shape
        qkv, mlp = self.linear1(h).split([3 * D, self.mlp_hidden], dim=-1)
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d) views
        return q, k, v, mlp

    def _output(self, x: Tensor, attn: Tensor, mlp: Tensor, gate: Tensor) -> Tensor:
        return x + per_token(gate) * self.linear2(torch.cat([attn.reshape(x.shape), self.act(mlp)], dim=-1))

    def forward(self, x: Tensor, context: Tensor, c: Tensor, txt_mask: Optional[Tensor] = None,
                img_freqs: Optional[Tensor] = None, txt_freqs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        D = self.hidden_size
        if x.dim() != 3 or x.shape[-1] != D:
            raise ValueError(f"SingleStreamDiTBlock: x must be (B, N, {D}), got {tuple(x.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != D:
            raise ValueError(f"SingleStreamDiTBlock: context must be (B, N_txt, {D}) with B = {x.shape[0]}, "
                             f"got {tuple(context.shape)}")
        shift, scale, gate = self.adaLN_modulation(c)
        real = None
        ctx = context
        if txt_mask is not None:
            real = _key_mask(txt_mask, context.shape[0], context.shape[1]).unsqueeze(-1)
            ctx = torch.where(real, context, 0.0)  # before the LayerNorm: a NaN row would poison the gradients
        q, k, v, mlp = self._project(self.norm(x, shift, scale))
        hc = self.norm(ctx, shift, scale)
        if real is not None:
            hc = torch.where(real, hc, 0.0)  # padded rows project zeros, as in JointAttention
        qt, kt, vt, mlp_t = self._project(hc)
        qw = self.q_norm.weight if self.qk_norm else None
        kw = self.k_norm.weight if self.qk_norm else None
        o_img, o_txt = joint_attention_qk(q, k, v, qt, kt, vt, txt_mask, q_weight=qw, k_weight=kw,
                                          txt_q_weight=qw, txt_k_weight=kw, img_freqs=img_freqs,
                                          txt_freqs=txt_freqs, eps=self.eps, interleaved=self.rope_interleaved,
                                          backend=self.backend)
        x = self._output(x, o_img, mlp, gate)
        new_context = self._output(ctx, o_txt, mlp_t, gate)
        if real is not None:
            new_context = torch.where(real, new_context, context)
        return x, new_context

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, mlp_hidden={self.mlp_hidden}, "
                f"qk_norm={self.qk_norm}, backend={self.backend!r}")
