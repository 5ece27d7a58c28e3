"""Patch a diffusers transformer onto fastdit's kernels, in place, keeping its parameters and keys.

    from fastdit.integrations.diffusers import apply_fastdit, unpatch_fastdit
    report = apply_fastdit(transformer)          # FluxTransformer2DModel, SD3Transformer2DModel, DiTTransformer2DModel
    ...                                          # train / sample / torch.compile as before
    unpatch_fastdit(transformer)                 # the stock model again (or: with fastdit_patched(transformer): ...)

What changes (nothing else is touched: no parameter, buffer or state-dict key is added, removed or renamed,
so peft LoRA adapters, gradient checkpointing, ``save_pretrained`` and ``torch.compile`` work as before):

- **AdaLN norms** (``AdaLayerNormZero``, ``AdaLayerNormZeroSingle``, ``AdaLayerNormContinuous``,
  ``SD35AdaLayerNormZeroX``): the LayerNorm and its modulation run as one fused op
  (:func:`fastdit.ops.adaln_modulate`). The norms' modulation linears stay as they are.
- **Blocks** (Flux's double-stream ``FluxTransformerBlock``, SD3's ``JointTransformerBlock``, DiT's
  ``BasicTransformerBlock`` with ``ada_norm_zero``): the gated residual after the attention and the
  LayerNorm+modulate before the MLP run as one fused op (:func:`fastdit.ops.gated_residual_adaln`);
  Flux's ``FluxSingleTransformerBlock`` passes the caption length to fastdit's processor.
- **Attention** (``FluxAttnProcessor``, ``JointAttnProcessor2_0``, ``AttnProcessor2_0``): QK RMSNorm, RoPE
  and the joint attention over both streams run as :func:`fastdit.ops.joint_attention_qk` (fused into the
  attention kernel where it wins); the streams are not concatenated. The projections are the module's own
  ``nn.Linear`` layers (LoRA-wrapped or fused with ``fuse_qkv_projections`` alike).

Each patched object is an instance of a subclass of the stock class (``module.__class__`` is swapped), and
each fastdit processor keeps the stock processor it replaced: a call it cannot represent (an attention
mask that is not a caption-padding mask, a ``LayerNorm`` QK-norm, spatial/group norms, cross-attention,
...) runs the stock processor, so results never depend on what fastdit supports. Modules it does not know
are left stock and listed in the returned :class:`PatchReport` (and a warning); a model with nothing
fastdit can patch is a ``ValueError`` naming its class.

Caption padding (Flux): an ``attention_mask`` passed through ``joint_attention_kwargs`` that masks caption
keys only (bool, True = attend, or additive 0/-inf; shape (B, S), (B, 1, S) or (B, 1, 1, S) over
``[caption, image]``) becomes fastdit's ``txt_mask``: padded caption keys get no weight, as in stock. One
difference, by design: fastdit's outputs at padded caption *query* rows are zero before ``to_add_out``
(stock computes them); no image token and no real caption token depends on them. In single-stream blocks
the patched block tells the processor where the caption ends, so the same holds there. SD3's stock
processor ignores ``attention_mask``; so does fastdit's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from fastdit.backend import resolve_backend
from fastdit.ops.adaln import adaln_modulate
from fastdit.ops.attention import joint_attention_qk
from fastdit.ops.gated_adaln import gated_residual_adaln

try:
    from diffusers.models import attention as _d_attention
    from diffusers.models import attention_processor as _d_processor
    from diffusers.models import normalization as _d_norm
    from diffusers.models.transformers import transformer_flux as _d_flux
except ImportError as err:  # pragma: no cover - diffusers is a dependency of fastdit
    raise ImportError(f"fastdit.integrations.diffusers needs diffusers ({err})") from None

__all__ = ["apply_fastdit", "unpatch_fastdit", "fastdit_patched", "PatchReport", "is_patched"]

_BACKEND_ATTR = "_fastdit_backend"


def _backend_of(obj) -> Optional[str]:
    return getattr(obj, _BACKEND_ATTR, None)


# ------------------------------------------------------------------------------------ shared checks

def _plain_layer_norm(norm) -> bool:
    """An affine-free LayerNorm over the last dimension (what the fused op computes)."""
    return (isinstance(norm, nn.LayerNorm) and norm.weight is None and getattr(norm, "bias", None) is None
            and len(norm.normalized_shape) == 1)


def _rms_weight(norm, head_dim: int, like: Tensor) -> Tuple[bool, Optional[Tensor], Optional[float]]:
    """(representable, weight, eps) of a QK-norm module: None (no norm), torch's or diffusers' RMSNorm
    without bias. An affine-free RMSNorm gets a weight of ones."""
    if norm is None:
        return True, None, None
    if isinstance(norm, nn.RMSNorm):
        weight, eps = norm.weight, norm.eps
    elif isinstance(norm, _d_norm.RMSNorm) and getattr(norm, "bias", None) is None:
        weight, eps = norm.weight, norm.eps
    else:
        return False, None, None
    if eps is None:  # torch's default: the input dtype's machine epsilon
        eps = torch.finfo(like.dtype).eps
    if weight is None:
        weight = torch.ones(head_dim, device=like.device, dtype=like.dtype)
    return True, weight, float(eps)


def _common_eps(*eps: Optional[float]) -> Tuple[bool, float]:
    values = {e for e in eps if e is not None}
    if len(values) > 1:
        return False, 1e-6
    return True, values.pop() if values else 1e-6


class _TableCache:
    """The last converted Flux RoPE table, keyed by the identity of diffusers' (cos, sin) pair: every block
    of one forward gets the same two tensors, so the conversion runs once per forward (eagerly; compiled
    code converts in the graph). Holding the tensors keeps the identity check sound."""
    entry: Optional[Tuple[Tensor, Tensor, Tensor]] = None


def _flux_table(rotary) -> Optional[Tensor]:
    """diffusers' Flux RoPE ``(cos, sin)``, each (S, d) with every angle repeated for its channel pair
    (``repeat_interleave_real``), as fastdit's table (S, d/2, 2) float32."""
    if rotary is None:
        return None
    cos, sin = rotary
    compiling = torch.compiler.is_compiling()
    cached = _TableCache.entry
    if not compiling and cached is not None and cached[0] is cos and cached[1] is sin:
        return cached[2]
    table = torch.stack([cos[..., 0::2], sin[..., 0::2]], dim=-1).to(torch.float32).contiguous()
    if not compiling:
        _TableCache.entry = (cos, sin, table)
    return table


def _caption_key_mask(mask: Optional[Tensor], batch: int, n_txt: int, n_total: int
                      ) -> Tuple[bool, Optional[Tensor]]:
    """(representable, txt_mask): a key mask over ``[caption, image]`` that keeps every image key and is
    the same for every query -> bool (B, n_txt), True = real caption token. Reads the mask (a host sync;
    only when a mask is given)."""
    if mask is None:
        return True, None
    m = mask
    while m.dim() > 2 and m.shape[1] == 1:
        m = m.squeeze(1)
    if m.dim() != 2 or m.shape[-1] != n_total or m.shape[0] not in (1, batch):
        return False, None
    if m.dtype == torch.bool:
        keep = m
    elif m.is_floating_point():
        zero, masked = m == 0, torch.isneginf(m)
        if not bool((zero | masked).all()):
            return False, None  # a soft bias, not a mask
        keep = zero
    else:
        return False, None
    keep = keep.expand(batch, n_total)
    if not bool(keep[:, n_txt:].all()):
        return False, None
    return True, keep[:, :n_txt].contiguous()


def _heads(t: Tensor, head_dim: int) -> Tensor:
    return t.unflatten(-1, (-1, head_dim))


def _projections(attn, hidden_states: Tensor, context: Optional[Tensor], head_dim: int):
    """((q, k, v), (q_txt, k_txt, v_txt)) as (B, N, H, d) views, through the attention module's own linears
    (fused by ``fuse_qkv_projections`` or not, LoRA-wrapped or not); the text triple is Nones without
    ``context``."""
    fused = getattr(attn, "fused_projections", False)
    if fused:
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    txt = (None, None, None)
    if context is not None:
        if fused and hasattr(attn, "to_added_qkv"):
            txt = attn.to_added_qkv(context).chunk(3, dim=-1)
        else:
            txt = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
        txt = tuple(_heads(t, head_dim) for t in txt)
    return (_heads(q, head_dim), _heads(k, head_dim), _heads(v, head_dim)), txt


# ------------------------------------------------------------------------------------- processors

class _FastProcessor:
    """Base of fastdit's attention processors: keeps the stock processor it replaces (``stock``) and runs
    it for calls fastdit cannot represent."""

    def __init__(self, stock, backend: Optional[str]):
        self.stock, self.backend = stock, backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stock={type(self.stock).__name__}, backend={self.backend!r})"


class FluxAttnProcessor(_FastProcessor):
    """fastdit's processor for diffusers' ``FluxAttention`` (double- and single-stream blocks)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb=None) -> Tensor:
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def attend(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
               attention_mask: Optional[Tensor] = None, image_rotary_emb=None, n_txt: int = 0) -> Tensor:
        """The processor's call; ``n_txt`` > 0 (from a patched single-stream block) says that the first
        ``n_txt`` tokens of ``hidden_states`` are the caption, so a caption-padding mask can be honoured."""
        d = attn.head_dim
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        ok_q, qw, eps_q = _rms_weight(attn.norm_q, d, hidden_states)
        ok_k, kw, eps_k = _rms_weight(attn.norm_k, d, hidden_states)
        tqw, tkw, ok_tq, ok_tk, eps_tq, eps_tk = qw, kw, True, True, None, None  # single stream: shared norms
        if joint:
            ok_tq, tqw, eps_tq = _rms_weight(attn.norm_added_q, d, hidden_states)
            ok_tk, tkw, eps_tk = _rms_weight(attn.norm_added_k, d, hidden_states)
        same_eps, eps = _common_eps(eps_q, eps_k, eps_tq, eps_tk)
        if joint:
            n_txt = encoder_hidden_states.shape[1]
        n_total = hidden_states.shape[1] + (n_txt if joint else 0)
        ok_mask, txt_mask = True, None
        if attention_mask is not None:
            ok_mask, txt_mask = ((False, None) if n_txt == 0 else
                                 _caption_key_mask(attention_mask, hidden_states.shape[0], n_txt, n_total))
        if not (ok_q and ok_k and ok_tq and ok_tk and same_eps and ok_mask):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        (q, k, v), (qt, kt, vt) = _projections(attn, hidden_states, encoder_hidden_states if joint else None, d)
        split = not joint and txt_mask is not None  # a padded caption inside a single stream: two streams
        if split:
            (qt, q), (kt, k), (vt, v) = (t.split([n_txt, t.shape[1] - n_txt], dim=1) for t in (q, k, v))
        table = _flux_table(image_rotary_emb)
        img_freqs, txt_freqs = table, None
        if table is not None and (joint or split):  # the table covers [caption, image]
            txt_freqs, img_freqs = table[:n_txt], table[n_txt:]
        if qt is None:
            tqw = tkw = None
        o_img, o_txt = joint_attention_qk(
            q, k, v, qt, kt, vt, txt_mask, q_weight=qw, k_weight=kw, txt_q_weight=tqw, txt_k_weight=tkw,
            img_freqs=img_freqs, txt_freqs=txt_freqs, eps=eps, interleaved=True, backend=self.backend)
        if split:
            return torch.cat([o_txt, o_img], dim=1).flatten(2).to(q.dtype)
        out = o_img.flatten(2).to(q.dtype)
        if not joint:
            return out  # single-stream blocks project outside the attention
        out = attn.to_out[1](attn.to_out[0](out))
        return out, attn.to_add_out(o_txt.flatten(2).to(q.dtype))


class JointAttnProcessor(_FastProcessor):
    """fastdit's processor for SD3's ``JointAttnProcessor2_0`` (also the image-only ``attn2`` of SD3.5)."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        heads = attn.heads
        d = attn.inner_dim // heads if hasattr(attn, "inner_dim") else None
        joint = encoder_hidden_states is not None
        ok = hidden_states.dim() == 3 and d is not None
        if ok:
            ok_q, qw, eps_q = _rms_weight(attn.norm_q, d, hidden_states)
            ok_k, kw, eps_k = _rms_weight(attn.norm_k, d, hidden_states)
            ok_tq = ok_tk = True
            tqw = tkw = eps_tq = eps_tk = None
            if joint:
                ok_tq, tqw, eps_tq = _rms_weight(getattr(attn, "norm_added_q", None), d, hidden_states)
                ok_tk, tkw, eps_tk = _rms_weight(getattr(attn, "norm_added_k", None), d, hidden_states)
            same_eps, eps = _common_eps(eps_q, eps_k, eps_tq, eps_tk)
            ok = ok_q and ok_k and ok_tq and ok_tk and same_eps
        if not ok:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        (q, k, v), (qt, kt, vt) = _projections(attn, hidden_states, encoder_hidden_states if joint else None, d)
        o_img, o_txt = joint_attention_qk(q, k, v, qt, kt, vt, None, q_weight=qw, k_weight=kw,
                                          txt_q_weight=tqw, txt_k_weight=tkw, eps=eps, backend=self.backend)
        out = attn.to_out[1](attn.to_out[0](o_img.flatten(2).to(q.dtype)))
        if not joint:
            return out
        o_txt = o_txt.flatten(2).to(q.dtype)
        if not attn.context_pre_only:
            o_txt = attn.to_add_out(o_txt)
        return out, o_txt


class SelfAttnProcessor(_FastProcessor):
    """fastdit's processor for ``AttnProcessor2_0`` as DiT uses it: self-attention on (B, N, C) tokens."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        heads = attn.heads
        simple = (hidden_states.dim() == 3 and encoder_hidden_states is None and attention_mask is None
                  and attn.spatial_norm is None and attn.group_norm is None and not attn.residual_connection
                  and attn.rescale_output_factor == 1.0 and not args and kwargs.get("scale") is None)
        d = attn.inner_dim // heads if simple else 0
        if simple:
            ok_q, qw, eps_q = _rms_weight(attn.norm_q, d, hidden_states)
            ok_k, kw, eps_k = _rms_weight(attn.norm_k, d, hidden_states)
            same_eps, eps = _common_eps(eps_q, eps_k)
            simple = ok_q and ok_k and same_eps and attn.inner_dim == attn.inner_kv_dim
        if not simple:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        (q, k, v), _ = _projections(attn, hidden_states, None, d)
        o, _ = joint_attention_qk(q, k, v, q_weight=qw, k_weight=kw, eps=eps, backend=self.backend)
        return attn.to_out[1](attn.to_out[0](o.flatten(2).to(q.dtype)))


# Stock processor class -> fastdit processor class. Exact classes only: a subclass may do anything.
_PROCESSORS = {
    _d_flux.FluxAttnProcessor: FluxAttnProcessor,
    _d_processor.JointAttnProcessor2_0: JointAttnProcessor,
    _d_processor.AttnProcessor2_0: SelfAttnProcessor,
}


# ------------------------------------------------------------------------------------------ norms

class _Patched:
    """Marker of a module whose class fastdit swapped; ``_fastdit_stock`` is the class it replaced."""
    _fastdit_stock: type


class AdaLayerNormZero(_Patched, _d_norm.AdaLayerNormZero):
    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = adaln_modulate(x, shift_msa, scale_msa, self.norm.eps, backend=_backend_of(self))
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(_Patched, _d_norm.AdaLayerNormZeroSingle):
    def forward(self, x, emb=None):
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
        return adaln_modulate(x, shift_msa, scale_msa, self.norm.eps, backend=_backend_of(self)), gate_msa


class AdaLayerNormContinuous(_Patched, _d_norm.AdaLayerNormContinuous):
    def forward(self, x, conditioning_embedding):
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return adaln_modulate(x, shift, scale, self.norm.eps, backend=_backend_of(self))


class SD35AdaLayerNormZeroX(_Patched, _d_norm.SD35AdaLayerNormZeroX):
    def forward(self, hidden_states, emb=None):
        emb = self.linear(self.silu(emb))
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
         gate_msa2) = emb.chunk(9, dim=1)
        backend = _backend_of(self)
        x1 = adaln_modulate(hidden_states, shift_msa, scale_msa, self.norm.eps, backend=backend)
        x2 = adaln_modulate(hidden_states, shift_msa2, scale_msa2, self.norm.eps, backend=backend)
        return x1, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2


def _norm_patchable(module) -> Optional[str]:
    """Why this stock norm module cannot be patched, or None."""
    if not _plain_layer_norm(getattr(module, "norm", None)):
        return f"its norm is {type(getattr(module, 'norm', None)).__name__} (an affine-free LayerNorm is fused)"
    return None


# ----------------------------------------------------------------------------------------- blocks

def _feed_forward(block, ff, h: Tensor) -> Tensor:
    if getattr(block, "_chunk_size", None) is not None:
        return _d_attention._chunked_feed_forward(ff, h, block._chunk_dim, block._chunk_size)
    return ff(h)


class FluxTransformerBlock(_Patched, _d_flux.FluxTransformerBlock):
    """Flux's double-stream block with each stream's gated residual + LayerNorm + modulate fused."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        backend = _backend_of(self)
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states,
                                                                                       emb=temb)
        outputs = self.attn(hidden_states=norm_x, encoder_hidden_states=norm_c, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
        attn_out, ctx_attn_out = outputs[0], outputs[1]
        hidden_states, h = gated_residual_adaln(hidden_states, attn_out, gate_msa, shift_mlp, scale_mlp,
                                                self.norm2.eps, backend=backend)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(h)
        if len(outputs) == 3:  # IP-adapter
            hidden_states = hidden_states + outputs[2]
        encoder_hidden_states, hc = gated_residual_adaln(encoder_hidden_states, ctx_attn_out, c_gate_msa,
                                                         c_shift_mlp, c_scale_mlp, self.norm2_context.eps,
                                                         backend=backend)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(hc)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(_Patched, _d_flux.FluxSingleTransformerBlock):
    """Flux's single-stream block; the stock code, except that it tells fastdit's processor where the
    caption ends, so that a caption-padding mask runs on fastdit's attention too."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None):
        kwargs = dict(joint_attention_kwargs or {})
        processor = self.attn.processor
        if not isinstance(processor, FluxAttnProcessor) or set(kwargs) - {"attention_mask"}:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                   joint_attention_kwargs)
        n_txt = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_x, gate = self.norm(hidden_states, emb=temb)
        mlp = self.act_mlp(self.proj_mlp(norm_x))
        attn_out = processor.attend(self.attn, norm_x, None, kwargs.get("attention_mask"), image_rotary_emb,
                                    n_txt=n_txt)
        hidden_states = residual + gate.unsqueeze(1) * self.proj_out(torch.cat([attn_out, mlp], dim=2))
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :n_txt], hidden_states[:, n_txt:]


class JointTransformerBlock(_Patched, _d_attention.JointTransformerBlock):
    """SD3's joint block (SD3.5's dual attention included) with the gated residual before each MLP fused
    with its LayerNorm + modulate."""

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        backend = _backend_of(self)
        kwargs = joint_attention_kwargs or {}
        if self.use_dual_attention:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_x2, gate_msa2 = self.norm1(hidden_states,
                                                                                               emb=temb)
        else:
            norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        if self.context_pre_only:
            norm_c = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states,
                                                                                           emb=temb)
        attn_out, ctx_attn_out = self.attn(hidden_states=norm_x, encoder_hidden_states=norm_c, **kwargs)
        if self.use_dual_attention:
            hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
            attn_out, gate_msa = self.attn2(hidden_states=norm_x2, **kwargs), gate_msa2
        hidden_states, h = gated_residual_adaln(hidden_states, attn_out, gate_msa, shift_mlp, scale_mlp,
                                                self.norm2.eps, backend=backend)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * _feed_forward(self, self.ff, h)
        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states, hc = gated_residual_adaln(encoder_hidden_states, ctx_attn_out, c_gate_msa,
                                                         c_shift_mlp, c_scale_mlp, self.norm2_context.eps,
                                                         backend=backend)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * _feed_forward(
            self, self.ff_context, hc)
        return encoder_hidden_states, hidden_states


class BasicTransformerBlock(_Patched, _d_attention.BasicTransformerBlock):
    """DiT's block (``norm_type="ada_norm_zero"``, self-attention only) with the gated residual after the
    attention fused with the MLP's LayerNorm + modulate."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        kwargs = dict(cross_attention_kwargs or {})
        if "gligen" in kwargs or hidden_states.dim() != 3:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        kwargs.pop("scale", None)  # deprecated and ignored by the stock block too
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, timestep, class_labels,
                                                                      hidden_dtype=hidden_states.dtype)
        attn_out = self.attn1(norm_x, encoder_hidden_states=None, attention_mask=attention_mask, **kwargs)
        hidden_states, h = gated_residual_adaln(hidden_states, attn_out, gate_msa, shift_mlp, scale_mlp,
                                                self.norm3.eps, backend=_backend_of(self))
        return hidden_states + gate_mlp.unsqueeze(1) * _feed_forward(self, self.ff, h)


def _block_patchable(module) -> Optional[str]:
    """Why this stock block cannot be patched, or None."""
    if isinstance(module, _d_attention.BasicTransformerBlock):
        if module.norm_type != "ada_norm_zero":
            return f"norm_type={module.norm_type!r} (ada_norm_zero is fused)"
        if module.attn2 is not None or module.only_cross_attention or module.pos_embed is not None:
            return "it has cross-attention or a positional embedding inside the block"
        if not _plain_layer_norm(module.norm3):
            return "its MLP norm is not an affine-free LayerNorm"
        return None
    if isinstance(module, _d_attention.JointTransformerBlock):
        norms = [module.norm2] + ([] if module.context_pre_only else [module.norm2_context])
    else:
        norms = [module.norm2, module.norm2_context]
    if not all(_plain_layer_norm(n) for n in norms):
        return "its MLP norms are not affine-free LayerNorms"
    return None


# Stock module class -> (fastdit subclass, why-not check). Exact classes only.
_MODULES = {
    _d_norm.AdaLayerNormZero: (AdaLayerNormZero, _norm_patchable),
    _d_norm.AdaLayerNormZeroSingle: (AdaLayerNormZeroSingle, _norm_patchable),
    _d_norm.AdaLayerNormContinuous: (AdaLayerNormContinuous, _norm_patchable),
    _d_norm.SD35AdaLayerNormZeroX: (SD35AdaLayerNormZeroX, _norm_patchable),
    _d_flux.FluxTransformerBlock: (FluxTransformerBlock, _block_patchable),
    _d_flux.FluxSingleTransformerBlock: (FluxSingleTransformerBlock, lambda module: None),
    _d_attention.JointTransformerBlock: (JointTransformerBlock, _block_patchable),
    _d_attention.BasicTransformerBlock: (BasicTransformerBlock, _block_patchable),
}
_SUPPORTED_MODELS = ("FluxTransformer2DModel", "SD3Transformer2DModel", "DiTTransformer2DModel")


# ------------------------------------------------------------------------------------ the public API

@dataclasses.dataclass
class PatchReport:
    """What :func:`apply_fastdit` did: ``patched`` counts modules and processors by stock class name;
    ``left_stock`` maps ``"<module path> (<class>)"`` to why it stayed stock."""
    model: str
    backend: Optional[str]
    patched: Dict[str, int] = dataclasses.field(default_factory=dict)
    left_stock: Dict[str, str] = dataclasses.field(default_factory=dict)

    def count(self, stock_name: str) -> None:
        self.patched[stock_name] = self.patched.get(stock_name, 0) + 1

    def __str__(self) -> str:
        done = ", ".join(f"{n} × {name}" for name, n in sorted(self.patched.items())) or "nothing"
        text = f"fastdit patched {self.model} (backend={self.backend!r}): {done}"
        if self.left_stock:
            text += f"; left stock ({len(self.left_stock)}): " + "; ".join(
                f"{where}: {why}" for where, why in list(self.left_stock.items())[:8])
            if len(self.left_stock) > 8:
                text += f"; … and {len(self.left_stock) - 8} more"
        return text


def is_patched(model: nn.Module) -> bool:
    """Whether any module or attention processor inside ``model`` is fastdit's."""
    return any(isinstance(m, _Patched) or isinstance(getattr(m, "processor", None), _FastProcessor)
               for m in model.modules())


def _unknown_reason(module: nn.Module) -> Optional[str]:
    """For a module fastdit has no version of: why a user should hear that it stayed stock (transformer
    blocks and AdaLN norms), or None (everything else: linears, activations, embeddings, ...)."""
    name = type(module).__name__
    if name.endswith("TransformerBlock"):
        return "no fastdit version of this block"
    if name.startswith(("AdaLayerNorm", "SD35AdaLayerNorm")):
        return "no fastdit version of this norm"
    return None


def apply_fastdit(model: nn.Module, backend: Optional[str] = "auto", *, warn: bool = True) -> PatchReport:
    """Patch a diffusers transformer (Flux, SD3/SD3.5, DiT) in place onto fastdit's fused ops.

    ``backend``: ``"auto"`` (Triton kernels on CUDA where they support the inputs, PyTorch elsewhere),
    ``"triton"`` (the kernels or a ``ValueError``), ``"reference"`` (fastdit's PyTorch path), or None (the
    global default, see :mod:`fastdit.backend`). Patching an already patched model only changes its backend.
    Returns a :class:`PatchReport`; modules left stock are also reported by a warning (``warn=False``
    silences it). Raises ``ValueError`` when nothing in the model is patchable, naming its class.
    """
    if backend is not None:
        resolve_backend(backend)  # validate the name
    if not isinstance(model, nn.Module):
        raise ValueError(f"apply_fastdit: expected a diffusers model (torch.nn.Module), got {type(model).__name__}")
    report = PatchReport(type(model).__name__, backend)
    for path, module in model.named_modules():
        where = f"{path or '<model>'} ({type(module).__name__})"
        if isinstance(module, _Patched):
            setattr(module, _BACKEND_ATTR, backend)
            report.count(module._fastdit_stock.__name__)
        elif type(module) in _MODULES:
            fast_class, why_not = _MODULES[type(module)]
            reason = why_not(module)
            if reason is None:
                stock = type(module)
                module.__class__ = fast_class
                module._fastdit_stock = stock
                setattr(module, _BACKEND_ATTR, backend)
                report.count(stock.__name__)
            else:
                report.left_stock[where] = reason
        elif _unknown_reason(module) is not None:
            report.left_stock[where] = _unknown_reason(module)
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        if isinstance(processor, _FastProcessor):
            processor.backend = backend
            report.count(type(processor.stock).__name__)
        elif type(processor) in _PROCESSORS:
            module.set_processor(_PROCESSORS[type(processor)](processor, backend))
            report.count(type(processor).__name__)
        else:
            report.left_stock[f"{path} processor"] = (f"{type(processor).__name__} has no fastdit version "
                                                      f"(IP-adapter and other custom processors stay stock)")
    if not report.patched:
        raise ValueError(f"apply_fastdit: nothing in {type(model).__name__} is patchable: fastdit knows diffusers' "
                         f"{', '.join(_SUPPORTED_MODELS)} (their AdaLN norms, blocks and attention processors)")
    if warn and report.left_stock:
        warnings.warn(str(report), stacklevel=2)
    return report


def unpatch_fastdit(model: nn.Module) -> int:
    """Restore every patched module and attention processor inside ``model`` to its stock class / the
    stock processor it replaced. Returns how many objects were restored (0 for an unpatched model)."""
    restored = 0
    _TableCache.entry = None
    for module in model.modules():
        if isinstance(module, _Patched):
            module.__class__ = module._fastdit_stock
            for attr in ("_fastdit_stock", _BACKEND_ATTR):
                module.__dict__.pop(attr, None)
            restored += 1
        processor = getattr(module, "processor", None)
        if isinstance(processor, _FastProcessor):
            module.set_processor(processor.stock)
            restored += 1
    return restored


@contextlib.contextmanager
def fastdit_patched(model: nn.Module, backend: Optional[str] = "auto", *, warn: bool = True
                    ) -> Iterator[PatchReport]:
    """``with fastdit_patched(model) as report: ...`` — patched inside, stock again afterwards (also when
    the body raises)."""
    report = apply_fastdit(model, backend, warn=warn)
    try:
        yield report
    finally:
        unpatch_fastdit(model)
