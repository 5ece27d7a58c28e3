"""Joint image-text attention (SD3/Flux MMDiT), and plain self-attention (DiT) as its special case.

One softmax attention over the concatenation ``[text tokens, image tokens]``: every query of either
stream attends to every key of both (symmetric joint attention). Returns the image and the text
outputs separately.

Shapes (``layout="bnhd"``, as the QKV projections produce them): ``q_img, k_img, v_img: (B, N_img, H, d)``,
``q_txt, k_txt, v_txt: (B, N_txt, H, d)`` or all three None (self-attention over the image tokens).
``layout="bhnd"`` takes and returns (B, H, N, d) instead.

``txt_mask`` marks real caption tokens: a bool tensor (B, N_txt), True = real, or an integer tensor
(B,) of lengths (the first ``len`` tokens are real). Padded caption tokens influence nothing, whatever
their q, k, v hold (NaN and inf included: uninitialised buffers, overflowing projections of padding
tokens): they get zero attention weight as keys, their rows of the text output are zero, and every
gradient at a padded position is zero (the incoming gradient of a padded output row is ignored). Every
implementation *selects* them away (``torch.where`` on the text stream before the math, SDPA or the
kernel, and on the padded output rows after it) rather than multiplying by the mask, which would
keep a NaN (0 · NaN = NaN). A sample with no real caption tokens attends over its image tokens only.

``scale`` defaults to 1/sqrt(d). Three implementations share this signature:

- :func:`joint_attention_ref`: explicit ``softmax(Q Kᵀ · scale) V`` in float32 — the ground truth;
- :func:`joint_attention_sdpa`: PyTorch SDPA on the concatenation — the ``"reference"`` backend
  (same math, O(N) memory, what stock PyTorch code runs);
- ``torch.ops.fastdit.joint_attention``: the library op (the Triton flash-attention kernel of
  ``kernels/attention.py`` where it can run, else the reference math);
- :func:`joint_attention_qk` adds per-stream QK RMSNorm and RoPE: fused into the kernel's loads, or as
  a separate per-token pass before the kernel or SDPA (see :func:`attention_path`).
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdit.backend import resolve_backend
from fastdit.ops._common import (check, check_floating, check_same_device, compute_dtype, join_reasons,
                                 kernel_can_run, needs_grad, owned_outputs, shape_str, triton_device_reason,
                                 use_triton)

KERNEL_READY = True  # see fastdit.ops.adaln.KERNEL_READY
TRITON_HEAD_DIMS = (64, 72, 80, 96, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OP = "joint_attention"

Pair = Tuple[Tensor, Optional[Tensor]]


# ------------------------------------------------------------------------------- checks and layout

def _to_bnhd(t: Optional[Tensor], layout: str) -> Optional[Tensor]:
    return t.transpose(1, 2) if (t is not None and layout == "bhnd") else t


def _check_and_canonicalize(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale, layout):
    """Validate; return (B, N, H, d) views of the six tensors (text may be None), the bool key mask
    (B, N_txt) or None, and the softmax scale."""
    check(layout in ("bnhd", "bhnd"), _OP, lambda: f"layout must be 'bnhd' or 'bhnd', got {layout!r}")
    txt = (q_txt, k_txt, v_txt)
    check(all(t is None for t in txt) or all(t is not None for t in txt), _OP,
          "give all of q_txt, k_txt, v_txt, or none of them")
    check_floating(_OP, q_img=q_img, k_img=k_img, v_img=v_img, q_txt=q_txt, k_txt=k_txt, v_txt=v_txt)
    check_same_device(_OP, q_img=q_img, k_img=k_img, v_img=v_img, q_txt=q_txt, k_txt=k_txt, v_txt=v_txt,
                      txt_mask=txt_mask)
    named = {"q_img": q_img, "k_img": k_img, "v_img": v_img, "q_txt": q_txt, "k_txt": k_txt, "v_txt": v_txt}
    dims = "(B, H, N, d)" if layout == "bhnd" else "(B, N, H, d)"
    for name, t in named.items():
        if t is not None:
            check(t.dim() == 4, _OP, lambda: f"{name} must be 4-D {dims} (layout={layout!r}), got {shape_str(t)}")
            check(t.dtype == q_img.dtype, _OP, lambda: f"{name} has dtype {t.dtype} but q_img has {q_img.dtype}")
    q_img, k_img, v_img, q_txt, k_txt, v_txt = (_to_bnhd(t, layout) for t in named.values())
    B, N_img, H, d = q_img.shape
    check(N_img >= 1, _OP, "the image stream needs at least one token")
    for name, t in (("k_img", k_img), ("v_img", v_img)):
        check(t.shape == q_img.shape, _OP, lambda: f"{name} must match q_img's shape {tuple(q_img.shape)} "
                                                   f"(B, N, H, d), got {tuple(t.shape)}")
    mask = None
    if q_txt is not None:
        N_txt = q_txt.shape[1]
        for name, t in (("q_txt", q_txt), ("k_txt", k_txt), ("v_txt", v_txt)):
            check(t.shape[0] == B and t.shape[2] == H and t.shape[3] == d and t.shape[1] == N_txt, _OP,
                  lambda: f"{name} must be (B, N_txt, H, d) = ({B}, {N_txt}, {H}, {d}) to match the image "
                  f"stream, got {tuple(t.shape)} (in (B, N, H, d) order)")
        if txt_mask is not None:
            mask = _key_mask(txt_mask, B, N_txt)
    else:
        check(txt_mask is None, _OP, "txt_mask was given without a text stream (q_txt, k_txt, v_txt)")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    return (q_img, k_img, v_img, q_txt, k_txt, v_txt), mask, float(scale)


def _key_mask(txt_mask: Tensor, B: int, N_txt: int) -> Tensor:
    if txt_mask.dtype == torch.bool:
        check(tuple(txt_mask.shape) == (B, N_txt), _OP,
              lambda: f"a bool txt_mask must be (B, N_txt) = ({B}, {N_txt}), got {shape_str(txt_mask)}")
        return txt_mask
    check(not txt_mask.is_floating_point() and not txt_mask.is_complex(), _OP,
          lambda: f"txt_mask must be bool (B, N_txt) or integer lengths (B,), got dtype {txt_mask.dtype}")
    check(tuple(txt_mask.shape) == (B,), _OP,
          lambda: f"integer txt_mask holds caption lengths and must be (B,) = ({B},), got {shape_str(txt_mask)}")
    # a data-dependent check: on CPU only (on CUDA it would cost a host sync per call; lengths outside
    # [0, N_txt] then act as 0 or N_txt) and not under torch.compile
    if txt_mask.device.type == "cpu" and not torch.compiler.is_compiling():
        check(bool(((txt_mask >= 0) & (txt_mask <= N_txt)).all()), _OP,
              lambda: f"caption lengths must lie in [0, {N_txt}], got {txt_mask.tolist()}")
    return torch.arange(N_txt, device=txt_mask.device) < txt_mask.unsqueeze(1)


def _real_rows(t: Optional[Tensor], mask: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` (B, N_txt, H, d) with its padded caption rows (``mask`` (B, N_txt) False) replaced by zeros: a
    select, so that NaN or inf there goes away too (multiplying by the mask would keep a NaN), and the
    gradient at those rows is 0. Unchanged without a mask."""
    if t is None or mask is None:
        return t
    return torch.where(mask[:, :, None, None], t, 0.0)


def _concat(img: Tensor, txt: Optional[Tensor]) -> Tensor:
    return img if txt is None else torch.cat([txt, img], dim=1)


def _full_key_mask(mask: Optional[Tensor], B: int, N_img: int, device) -> Optional[Tensor]:
    """(B, N_txt + N_img) bool over the concatenated keys; image keys are always valid."""
    if mask is None:
        return None
    return torch.cat([mask, torch.ones(B, N_img, dtype=torch.bool, device=device)], dim=1)


def _split(out: Tensor, N_txt: int, has_txt: bool, layout: str) -> Pair:
    """(B, N_txt + N_img, H, d) -> image and text outputs in the caller's layout."""
    o_txt, o_img = out[:, :N_txt], out[:, N_txt:]
    if layout == "bhnd":
        o_txt, o_img = o_txt.transpose(1, 2), o_img.transpose(1, 2)
    return o_img, (o_txt if has_txt else None)


# ------------------------------------------------------------------------------- the explicit math

def _attention_forward_math(q, k, v, key_mask, scale) -> Tuple[Tensor, Tensor]:
    """q, k, v: (B, N, H, d) concatenated; returns out (B, N, H, d) in compute dtype and lse (B, H, N).
    Masked positions (key_mask (B, N) False) are zeros as queries, keys and values, and their output rows
    are zero."""
    q, k, v = (_real_rows(t, key_mask) for t in (q, k, v))
    acc = compute_dtype(q)
    qh, kh, vh = (t.to(acc).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    scores = qh @ kh.transpose(-1, -2) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return _real_rows((probs @ vh).transpose(1, 2), key_mask), lse


def _attention_backward_math(dout, q, k, v, out, lse, key_mask, scale):
    """Recompute P from lse; dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K·s, dK = dSᵀ Q·s. Masked
    positions are zeros (in q, k, v and dout: a masked output row is a constant 0), so their gradients are
    exactly 0."""
    dout, q, k, v, out = (_real_rows(t, key_mask) for t in (dout, q, k, v, out))
    acc = lse.dtype
    qh, kh, vh, oh, doh = (t.to(acc).transpose(1, 2) for t in (q, k, v, out, dout))
    scores = qh @ kh.transpose(-1, -2) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))
    dv = probs.transpose(-1, -2) @ doh
    delta = (doh * oh).sum(-1, keepdim=True)
    dscores = probs * (doh @ vh.transpose(-1, -2) - delta)
    dq = dscores @ kh * scale
    dk = dscores.transpose(-1, -2) @ qh * scale
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def joint_attention_ref(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Optional[Tensor] = None,
                        k_txt: Optional[Tensor] = None, v_txt: Optional[Tensor] = None,
                        txt_mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
                        layout: str = "bnhd") -> Pair:
    """Reference joint attention: explicit ``softmax(Q Kᵀ · scale + mask) V`` over [text, image] in
    float32 (float64 for float64 inputs). Returns ``(out_img, out_txt)``; out_txt is None without a text
    stream. O(N²) memory: for tests and small inputs."""
    (qi, ki, vi, qt, kt, vt), mask, scale = _check_and_canonicalize(
        q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale, layout)
    B, N_img = qi.shape[:2]
    N_txt = 0 if qt is None else qt.shape[1]
    out, _ = _attention_forward_math(_concat(qi, qt), _concat(ki, kt), _concat(vi, vt),
                                     _full_key_mask(mask, B, N_img, qi.device), scale)
    return _split(out.to(q_img.dtype), N_txt, qt is not None, layout)


def _sdpa_canonical(qi, ki, vi, qt, kt, vt, mask, scale, layout) -> Pair:
    B, N_img = qi.shape[:2]
    N_txt = 0 if qt is None else qt.shape[1]
    # padded caption rows selected away before the concatenation (SDPA's zero weights would keep a NaN of
    # v, and a padded query row would still attend), and the padded rows of the text output zeroed after
    qt, kt, vt = (_real_rows(t, mask) for t in (qt, kt, vt))
    q, k, v = (_concat(a, b).transpose(1, 2) for a, b in ((qi, qt), (ki, kt), (vi, vt)))
    key_mask = _full_key_mask(mask, B, N_img, qi.device)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).transpose(1, 2)
    if mask is None:
        return _split(out, N_txt, qt is not None, layout)
    o_img, o_txt = _split(out, N_txt, True, "bnhd")
    o_txt = _real_rows(o_txt, mask)
    if layout == "bhnd":
        o_img, o_txt = o_img.transpose(1, 2), o_txt.transpose(1, 2)
    return o_img, o_txt


def joint_attention_sdpa(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Optional[Tensor] = None,
                         k_txt: Optional[Tensor] = None, v_txt: Optional[Tensor] = None,
                         txt_mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
                         layout: str = "bnhd") -> Pair:
    """Joint attention through ``F.scaled_dot_product_attention`` on the concatenated sequence: what
    stock PyTorch MMDiT code does (concatenate, attend, split). Same semantics as the reference."""
    tensors, mask, scale = _check_and_canonicalize(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale,
                                                   layout)
    return _sdpa_canonical(*tensors, mask, scale, layout)


# ------------------------------------------------------------------- fused QK-norm / RoPE + attention
# Implementations shared by the two library ops: the Triton kernel (kernels/attention.py) when it can run
# these tensors, else the reference math. Canonical inputs: (B, N, H, d) with any strides, the text stream
# always present (N_txt may be 0), bool key mask (B, N_txt) or None.

def _prep_stream(q, k, q_weight, k_weight, freqs, eps, interleaved):
    """Reference QK-norm + RoPE of one stream (what the fused kernel applies on load): (q', k', q_rstd,
    k_rstd), or None when the stream is empty or has neither."""
    if q.shape[1] == 0 or (q_weight is None and freqs is None):
        return None
    from fastdit.ops import qk_norm_rotary
    return qk_norm_rotary._forward_math(q, k, q_weight, k_weight, freqs, eps, interleaved)


def _prepped(prep, q, k):
    return (q, k) if prep is None else (prep[0], prep[1])


def _fused_math(qi, ki, vi, qt, kt, vt, mask, scale, img_freqs, txt_freqs, qwi, kwi, qwt, kwt, eps, interleaved):
    qt, kt, vt = (_real_rows(t, mask) for t in (qt, kt, vt))  # before the norm: as the kernel loads them
    qi, ki = _prepped(_prep_stream(qi, ki, qwi, kwi, img_freqs, eps, interleaved), qi, ki)
    qt, kt = _prepped(_prep_stream(qt, kt, qwt, kwt, txt_freqs, eps, interleaved), qt, kt)
    B, N_img = qi.shape[:2]
    N_txt = qt.shape[1]
    out, lse = _attention_forward_math(torch.cat([qt, qi], 1), torch.cat([kt, ki], 1), torch.cat([vt, vi], 1),
                                       _full_key_mask(mask, B, N_img, qi.device), scale)
    out = out.to(vi.dtype)
    return out[:, N_txt:], out[:, :N_txt], lse


def _kernel_takes(tensors, tables) -> bool:
    # Triton's CPU interpreter computes tl.dot on bfloat16 wrongly: there bf16 takes the reference math
    interpreted_bf16 = tensors[0].device.type != "cuda" and any(
        t is not None and t.dtype == torch.bfloat16 for t in tensors)
    return (kernel_can_run(*tensors) and not interpreted_bf16
            and all(t is None or t.dtype == torch.float32 for t in tables))


def _streams(qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, qwi, kwi, qwt, kwt):
    """The kernels' two Streams. Padded caption rows of q, k, v are selected away here (zeros), whatever they
    hold: the kernels weight padded keys by 0, but 0 · NaN = NaN. Three small ops on the text stream only;
    none without a mask. (Selecting inside the kernels instead, k and v loaded under the key mask, made the
    forward 25% slower at d = 64 with 154 caption tokens, bf16, H100: the kernels stay as they were.)"""
    from fastdit.kernels.attention import Stream
    qt, kt, vt = (_real_rows(t, mask) for t in (qt, kt, vt))
    mask8 = None if mask is None else mask.to(torch.int8).contiguous()
    return Stream(qt, kt, vt, qwt, kwt, txt_freqs, mask8), Stream(qi, ki, vi, qwi, kwi, img_freqs)


def _fused_forward_impl(qi, ki, vi, qt, kt, vt, mask, scale, img_freqs, txt_freqs, qwi, kwi, qwt, kwt, eps,
                        interleaved):
    """Returns (o_img, o_txt, lse (B, H, N_txt + N_img) fp32)."""
    if _kernel_takes((qi, ki, vi, qt, kt, vt, qwi, kwi, qwt, kwt), (img_freqs, txt_freqs)):
        from fastdit.kernels.attention import attention_fwd
        txt, img = _streams(qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, qwi, kwi, qwt, kwt)
        o_img, o_txt, lse = attention_fwd(txt, img, scale, eps, interleaved)
        # padded caption queries (zeros after _streams) get finite outputs from the kernel; they are defined
        # as zero: one select on the text output, none without a mask
        return o_img, _real_rows(o_txt, mask), lse
    o_img, o_txt, lse = _fused_math(qi, ki, vi, qt, kt, vt, mask, scale, img_freqs, txt_freqs, qwi, kwi, qwt, kwt,
                                    eps, interleaved)
    return o_img.contiguous(), o_txt.contiguous(), lse.float()


def _fused_backward_impl(do_img, do_txt, qi, ki, vi, qt, kt, vt, o_img, o_txt, lse, mask, scale, img_freqs,
                         txt_freqs, qwi, kwi, qwt, kwt, eps, interleaved):
    """Returns (dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt, dq_w_img, dk_w_img, dq_w_txt, dk_w_txt); a
    weight's gradient is None where it is absent. The six main gradients may come back in the compute dtype:
    callers cast."""
    weights = (qwi, kwi, qwt, kwt)
    if _kernel_takes((do_img, do_txt, qi, ki, vi, qt, kt, vt) + weights, (img_freqs, txt_freqs)):
        from fastdit.kernels.attention import attention_bwd
        txt, img = _streams(qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, qwi, kwi, qwt, kwt)
        # a padded output row is a constant 0: its incoming gradient is ignored (zeros: delta and ds vanish)
        do_txt = _real_rows(do_txt, mask)
        g = attention_bwd(do_img, do_txt, txt, img, o_img, o_txt, lse, scale, eps, interleaved)
        wgrads = [None if w is None else g[key].to(w.dtype)
                  for w, key in zip(weights, ("dq_weight_img", "dk_weight_img", "dq_weight_txt", "dk_weight_txt"))]
        return (g["dq_img"], g["dk_img"], g["dv_img"], g["dq_txt"], g["dk_txt"], g["dv_txt"], *wgrads)
    # reference math (the O(N²) path for float64 and what the interpreter cannot run): recompute the
    # normalised, rotated q and k, take the attention backward, then the QK-norm / RoPE backward
    from fastdit.ops import qk_norm_rotary
    B, N_img = qi.shape[:2]
    N_txt = qt.shape[1]
    # padded caption rows as zeros, the incoming gradient of their (zero) outputs ignored: NaN there would
    # reach the norm's backward (through its rstd) even where the attention's gradient is 0
    qt, kt, vt, do_txt = (_real_rows(t, mask) for t in (qt, kt, vt, do_txt))
    prepped = [_prep_stream(qi, ki, qwi, kwi, img_freqs, eps, interleaved),
               _prep_stream(qt, kt, qwt, kwt, txt_freqs, eps, interleaved)]
    (qhi, khi), (qht, kht) = _prepped(prepped[0], qi, ki), _prepped(prepped[1], qt, kt)
    dq, dk, dv = _attention_backward_math(torch.cat([do_txt, do_img], 1), torch.cat([qht, qhi], 1),
                                          torch.cat([kht, khi], 1), torch.cat([vt, vi], 1),
                                          torch.cat([o_txt, o_img], 1), lse.to(compute_dtype(qi)),
                                          _full_key_mask(mask, B, N_img, qi.device), scale)
    out = {"img": [dq[:, N_txt:], dk[:, N_txt:], None, None], "txt": [dq[:, :N_txt], dk[:, :N_txt], None, None]}
    for name, p, q, k, qw, kw, freqs in (("img", prepped[0], qi, ki, qwi, kwi, img_freqs),
                                         ("txt", prepped[1], qt, kt, qwt, kwt, txt_freqs)):
        if p is not None:
            g = qk_norm_rotary._backward_math(out[name][0], out[name][1], q, k, qw, kw, freqs, p[2], p[3],
                                              interleaved)
            out[name] = [g[0], g[1], None if qw is None else g[2], None if kw is None else g[3]]
        elif q.shape[1] == 0:  # an empty stream's weights get zero gradients
            out[name][2:] = [None if w is None else torch.zeros_like(w) for w in (qw, kw)]
    return (out["img"][0], out["img"][1], dv[:, N_txt:], out["txt"][0], out["txt"][1], dv[:, :N_txt],
            out["img"][2], out["img"][3], out["txt"][2], out["txt"][3])


# -------------------------------------------------------------------------------- torch.library ops
# fastdit::joint_attention (plain) and fastdit::joint_attention_qk (QK-norm / RoPE fused on load). Outputs
# contiguous (B, N, H, d) and the log-sum-exp (B, H, N_txt + N_img) for the backward. Library ops cannot
# return None: absent weight gradients come back as empty tensors.

def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32) if t is None else t


@torch.library.custom_op("fastdit::joint_attention", mutates_args=())
def _joint_attention_op(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Tensor, k_txt: Tensor, v_txt: Tensor,
                        txt_mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    out = _fused_forward_impl(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale, None, None, None, None,
                              None, None, 1e-6, True)
    return owned_outputs(out, (q_img, k_img, v_img, q_txt, k_txt, v_txt))


def _fake_forward(q_img, q_txt):
    B, N_img, H, _ = q_img.shape
    N = N_img + q_txt.shape[1]
    return (torch.empty_like(q_img, memory_format=torch.contiguous_format),
            torch.empty_like(q_txt, memory_format=torch.contiguous_format),
            q_img.new_empty((B, H, N), dtype=torch.float32))


@_joint_attention_op.register_fake
def _(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale):
    return _fake_forward(q_img, q_txt)


@torch.library.custom_op("fastdit::joint_attention_backward", mutates_args=())
def _joint_attention_backward_op(do_img: Tensor, do_txt: Tensor, q_img: Tensor, k_img: Tensor, v_img: Tensor,
                                 q_txt: Tensor, k_txt: Tensor, v_txt: Tensor, o_img: Tensor, o_txt: Tensor,
                                 lse: Tensor, txt_mask: Optional[Tensor], scale: float
                                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _fused_backward_impl(do_img, do_txt, q_img, k_img, v_img, q_txt, k_txt, v_txt, o_img, o_txt, lse,
                                 txt_mask, scale, None, None, None, None, None, None, 1e-6, True)[:6]
    grads = tuple(g.to(t.dtype) for g, t in zip(grads, (q_img, k_img, v_img, q_txt, k_txt, v_txt)))
    return owned_outputs(grads, (do_img, do_txt, q_img, k_img, v_img, q_txt, k_txt, v_txt, o_img, o_txt, lse))


@_joint_attention_backward_op.register_fake
def _(do_img, do_txt, q_img, k_img, v_img, q_txt, k_txt, v_txt, o_img, o_txt, lse, txt_mask, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (q_img, k_img, v_img, q_txt, k_txt, v_txt))


def _setup_context(ctx, inputs, output):
    q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale = inputs
    o_img, o_txt, lse = output
    ctx.save_for_backward(q_img, k_img, v_img, q_txt, k_txt, v_txt, o_img, o_txt, lse, txt_mask)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do_img, do_txt, _dlse):
    q_img, k_img, v_img, q_txt, k_txt, v_txt, o_img, o_txt, lse, txt_mask = ctx.saved_tensors
    grads = torch.ops.fastdit.joint_attention_backward(
        do_img.contiguous(), do_txt.contiguous(), q_img, k_img, v_img, q_txt, k_txt, v_txt,
        o_img, o_txt, lse, txt_mask, ctx.scale)
    return (*grads, None, None)


_joint_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastdit::joint_attention_qk", mutates_args=())
def _joint_attention_qk_op(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Tensor, k_txt: Tensor,
                           v_txt: Tensor, txt_mask: Optional[Tensor], img_freqs: Optional[Tensor],
                           txt_freqs: Optional[Tensor], q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                           txt_q_weight: Optional[Tensor], txt_k_weight: Optional[Tensor], scale: float, eps: float,
                           interleaved: bool) -> Tuple[Tensor, Tensor, Tensor]:
    out = _fused_forward_impl(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale, img_freqs, txt_freqs,
                              q_weight, k_weight, txt_q_weight, txt_k_weight, eps, interleaved)
    return owned_outputs(out, (q_img, k_img, v_img, q_txt, k_txt, v_txt))


@_joint_attention_qk_op.register_fake
def _(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, img_freqs, txt_freqs, q_weight, k_weight, txt_q_weight,
      txt_k_weight, scale, eps, interleaved):
    return _fake_forward(q_img, q_txt)


@torch.library.custom_op("fastdit::joint_attention_qk_backward", mutates_args=())
def _joint_attention_qk_backward_op(do_img: Tensor, do_txt: Tensor, q_img: Tensor, k_img: Tensor, v_img: Tensor,
                                    q_txt: Tensor, k_txt: Tensor, v_txt: Tensor, o_img: Tensor, o_txt: Tensor,
                                    lse: Tensor, txt_mask: Optional[Tensor], img_freqs: Optional[Tensor],
                                    txt_freqs: Optional[Tensor], q_weight: Optional[Tensor],
                                    k_weight: Optional[Tensor], txt_q_weight: Optional[Tensor],
                                    txt_k_weight: Optional[Tensor], scale: float, eps: float, interleaved: bool
                                    ) -> List[Tensor]:
    grads = _fused_backward_impl(do_img, do_txt, q_img, k_img, v_img, q_txt, k_txt, v_txt, o_img, o_txt, lse,
                                 txt_mask, scale, img_freqs, txt_freqs, q_weight, k_weight, txt_q_weight,
                                 txt_k_weight, eps, interleaved)
    tensors = (q_img, k_img, v_img, q_txt, k_txt, v_txt)
    main = [g.to(t.dtype) for g, t in zip(grads[:6], tensors)]
    weights = [_or_empty(g, q_img) for g in grads[6:]]
    return list(owned_outputs(main + weights, (do_img, do_txt) + tensors + (o_img, o_txt, lse)))


@_joint_attention_qk_backward_op.register_fake
def _(do_img, do_txt, q_img, k_img, v_img, q_txt, k_txt, v_txt, o_img, o_txt, lse, txt_mask, img_freqs, txt_freqs,
      q_weight, k_weight, txt_q_weight, txt_k_weight, scale, eps, interleaved):
    main = [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (q_img, k_img, v_img, q_txt, k_txt, v_txt)]
    return main + [torch.empty_like(w) if w is not None else q_img.new_empty((0,), dtype=torch.float32)
                   for w in (q_weight, k_weight, txt_q_weight, txt_k_weight)]


def _setup_context_qk(ctx, inputs, output):
    (q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, img_freqs, txt_freqs, q_weight, k_weight, txt_q_weight,
     txt_k_weight, scale, eps, interleaved) = inputs
    o_img, o_txt, lse = output
    ctx.save_for_backward(q_img, k_img, v_img, q_txt, k_txt, v_txt, o_img, o_txt, lse, txt_mask, img_freqs,
                          txt_freqs, q_weight, k_weight, txt_q_weight, txt_k_weight)
    ctx.scale, ctx.eps, ctx.interleaved = scale, eps, interleaved
    ctx.mark_non_differentiable(lse)


def _backward_qk(ctx, do_img, do_txt, _dlse):
    saved = ctx.saved_tensors
    grads = torch.ops.fastdit.joint_attention_qk_backward(do_img.contiguous(), do_txt.contiguous(), *saved,
                                                          ctx.scale, ctx.eps, ctx.interleaved)
    weights = saved[12:]
    wgrads = [None if w is None else g for g, w in zip(grads[6:], weights)]
    return (*grads[:6], None, None, None, *wgrads, None, None, None)


_joint_attention_qk_op.register_autograd(_backward_qk, setup_context=_setup_context_qk)


class _JointAttentionFunction(torch.autograd.Function):
    """Eager fast path (see fastdit.ops.adaln._AdaLNFunction): the same implementations as the library ops
    without their Python-level autograd overhead."""

    @staticmethod
    def forward(ctx, qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, qwi, kwi, qwt, kwt, scale, eps,
                interleaved):
        o_img, o_txt, lse = _fused_forward_impl(qi, ki, vi, qt, kt, vt, mask, scale, img_freqs, txt_freqs, qwi,
                                                kwi, qwt, kwt, eps, interleaved)
        ctx.save_for_backward(qi, ki, vi, qt, kt, vt, o_img, o_txt, lse, mask, img_freqs, txt_freqs, qwi, kwi, qwt,
                              kwt)
        ctx.scale, ctx.eps, ctx.interleaved = scale, eps, interleaved
        ctx.mark_non_differentiable(lse)
        return o_img, o_txt

    @staticmethod
    def backward(ctx, do_img, do_txt):
        qi, ki, vi, qt, kt, vt, o_img, o_txt, lse, mask, img_freqs, txt_freqs, qwi, kwi, qwt, kwt = ctx.saved_tensors
        grads = _fused_backward_impl(do_img.contiguous(), do_txt.contiguous(), qi, ki, vi, qt, kt, vt, o_img,
                                     o_txt, lse, mask, ctx.scale, img_freqs, txt_freqs, qwi, kwi, qwt, kwt, ctx.eps,
                                     ctx.interleaved)
        main = [g.to(t.dtype) for g, t in zip(grads[:6], (qi, ki, vi, qt, kt, vt))]
        return (*main, None, None, None, *grads[6:], None, None, None)


def triton_unsupported_reason(q_img: Tensor) -> Optional[str]:
    """Why the Triton kernel cannot take these (validated, (B, N, H, d)) inputs, or None."""
    return join_reasons(
        triton_device_reason(q_img),
        f"dtype {q_img.dtype}; the attention kernel takes float16, bfloat16 and float32"
        if q_img.dtype not in TRITON_DTYPES else None,
        f"head dim {q_img.shape[-1]} is not supported by the attention kernel "
        f"(supported: {', '.join(map(str, TRITON_HEAD_DIMS))})" if q_img.shape[-1] not in TRITON_HEAD_DIMS else None)


def _fast_call(qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, qwi, kwi, qwt, kwt, scale, eps, interleaved,
               layout) -> Pair:
    has_txt = qt is not None
    if not has_txt:  # self-attention: an empty text stream keeps one signature
        qt = kt = vt = qi.new_empty((qi.shape[0], 0) + tuple(qi.shape[2:]))
    plain = img_freqs is None and txt_freqs is None and all(w is None for w in (qwi, kwi, qwt, kwt))
    if torch.compiler.is_compiling():
        if plain:
            o_img, o_txt, _ = torch.ops.fastdit.joint_attention(qi, ki, vi, qt, kt, vt, mask, scale)
        else:
            o_img, o_txt, _ = torch.ops.fastdit.joint_attention_qk(qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs,
                                                                   qwi, kwi, qwt, kwt, scale, eps, interleaved)
    elif needs_grad(qi, ki, vi, qt, kt, vt, qwi, kwi, qwt, kwt):
        o_img, o_txt = _JointAttentionFunction.apply(qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, qwi, kwi,
                                                     qwt, kwt, scale, eps, interleaved)
    else:
        o_img, o_txt, _ = _fused_forward_impl(qi, ki, vi, qt, kt, vt, mask, scale, img_freqs, txt_freqs, qwi, kwi,
                                              qwt, kwt, eps, interleaved)
    if layout == "bhnd":
        o_img, o_txt = o_img.transpose(1, 2), o_txt.transpose(1, 2)
    return o_img, (o_txt if has_txt else None)


# ------------------------------------------------------------------------------------------ dispatch
# Under backend="auto" on CUDA, a shape takes one of three paths — whichever a one-off measurement of
# forward+backward on this device found fastest (cached per shape; FASTDIT_ATTENTION_PATH or
# set_attention_path() override it):
#   "kernel"  fastdit's attention kernel, QK-norm/RoPE (if any) applied inside it as q and k are loaded;
#   "prepass" fastdit's QK-norm/RoPE kernel once per token, then fastdit's attention kernel (the fused
#             kernel re-normalises and re-rotates every key block once per query block);
#   "sdpa"    the QK-norm/RoPE kernel (if any), then PyTorch SDPA on the concatenation.
# Without QK-norm or RoPE, "prepass" is "kernel".

ATTENTION_PATHS = ("kernel", "prepass", "sdpa")
_path_override: Optional[str] = os.environ.get("FASTDIT_ATTENTION_PATH") or None
_path_cache: Dict[str, str] = {}


def set_attention_path(path: Optional[str]) -> None:
    """Force one of :data:`ATTENTION_PATHS` for every shape under ``backend="auto"`` (None: measure per shape)."""
    global _path_override
    if path is not None and path not in ATTENTION_PATHS:
        raise ValueError(f"attention path must be one of {ATTENTION_PATHS} or None, got {path!r}")
    _path_override = path


def _path_key(qi: Tensor, qt: Optional[Tensor], fused: bool) -> str:
    """"B,N_img,N_txt,H,d,dtype,fused" — plain text, so that choices travel in checkpoints and between ranks."""
    B, N_img, H, d = qi.shape
    return f"{B},{N_img},{0 if qt is None else qt.shape[1]},{H},{d},{str(qi.dtype).replace('torch.', '')},{int(fused)}"


def attention_path_choices() -> Dict[str, str]:
    """The paths ``"auto"`` has measured and chosen so far in this process, by shape (see :func:`_path_key`)."""
    return dict(_path_cache)


def set_attention_path_choices(choices: Dict[str, str]) -> None:
    """Adopt earlier choices (another rank's, a checkpoint's): those shapes then take them without
    measuring. The trainer uses this so that every rank, and a resumed run, runs the same paths."""
    for key, path in choices.items():
        if path not in ATTENTION_PATHS or not isinstance(key, str) or key.count(",") != 6:
            raise ValueError(f"not an attention path choice: {key!r} -> {path!r}")
    _path_cache.update(choices)


def _measure_paths(qi: Tensor, qt: Optional[Tensor], fused: bool) -> str:
    """Time forward+backward of each path on random inputs of these shapes (CUDA events, median of 5); the
    fastest path's name."""
    B, N_img, H, d = qi.shape
    N_txt = 0 if qt is None else qt.shape[1]
    dev, dt = qi.device, qi.dtype
    # a private generator: measuring must not advance the global RNG (a resumed run measures again, at
    # another step than the run it continues, and must still draw the same noise)
    gen = torch.Generator(device=dev).manual_seed(0)
    make = lambda n: torch.randn(B, n, H, d, device=dev, dtype=dt, generator=gen).requires_grad_()  # noqa: E731
    img = [make(N_img) for _ in range(3)]
    txt = [make(N_txt) for _ in range(3)] if N_txt else [None] * 3
    extras = (None,) * 6  # img_freqs, txt_freqs, q_weight, k_weight, txt_q_weight, txt_k_weight
    if fused:
        w = [torch.ones(d, device=dev, requires_grad=True) for _ in range(4)]
        extras = (torch.zeros(N_img, d // 2, 2, device=dev), None, w[0], w[1], *(w[2:] if N_txt else (None, None)))
    scale = 1.0 / math.sqrt(d)
    times = {}
    for path in (ATTENTION_PATHS if fused else ("kernel", "sdpa")):
        def step():
            out = _run_path(path, *img, *txt, None, *extras, scale, 1e-6, True, "bnhd")
            sum(o.float().sum() for o in out if o is not None).backward()
        for _ in range(2):
            step()
        samples = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        times[path] = sorted(samples)[2]
    return min(times, key=times.get)


def attention_path(q_img: Tensor, q_txt: Optional[Tensor] = None, *, fused_qk: bool = False,
                   backend: Optional[str] = None) -> str:
    """Which path ``joint_attention`` (``fused_qk=False``) or ``joint_attention_qk`` (True) takes for inputs
    shaped like these ((B, N, H, d) layout): ``"kernel"`` (fastdit's flash-attention kernel, QK-norm/RoPE
    fused into its loads), ``"prepass"`` (fastdit's QK-norm/RoPE kernel, then the attention kernel; only
    chosen with ``fused_qk``) or ``"sdpa"`` (PyTorch SDPA, after the QK-norm/RoPE kernel where there is
    one). Under ``"auto"`` on CUDA the first call for a shape measures them and caches the fastest; under
    torch.compile an unmeasured shape takes SDPA (call this eagerly first, or set FASTDIT_ATTENTION_PATH,
    to choose a kernel path there)."""
    chosen = resolve_backend(backend)
    if chosen == "reference":
        return "sdpa"
    if chosen == "triton":
        return "kernel"
    if _path_override is not None and _path_override not in ATTENTION_PATHS:  # a typo must not go unnoticed
        raise ValueError(f"FASTDIT_ATTENTION_PATH must be one of {', '.join(ATTENTION_PATHS)} (or unset), "
                         f"got {_path_override!r}")
    if not (KERNEL_READY and q_img.is_cuda) or triton_unsupported_reason(q_img) is not None:
        return "sdpa"
    if _path_override is not None:
        return _path_override
    key = _path_key(q_img, q_txt, fused_qk)
    if key not in _path_cache:
        if torch.compiler.is_compiling():  # cannot time while tracing: the stock path, unless measured before
            return "sdpa"
        with torch.enable_grad():
            _path_cache[key] = _measure_paths(q_img, q_txt, fused_qk)
    return _path_cache[key]


def joint_attention(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Optional[Tensor] = None,
                    k_txt: Optional[Tensor] = None, v_txt: Optional[Tensor] = None,
                    txt_mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
                    layout: str = "bnhd", backend: Optional[str] = None) -> Pair:
    """Joint attention over [text, image]; returns ``(out_img, out_txt)`` (see the module docstring).

    ``backend``: ``"triton"`` runs fastdit's flash-attention kernel, ``"reference"`` PyTorch SDPA, ``"auto"``
    whichever :func:`attention_path` picks (on CUDA, where the kernel supports the inputs). It is
    :func:`joint_attention_qk` without QK-norm and RoPE.
    """
    return joint_attention_qk(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale=scale, layout=layout,
                              backend=backend)


def _check_qk_extras(qi, qt, q_weight, k_weight, txt_q_weight, txt_k_weight, img_freqs, txt_freqs):
    d = qi.shape[-1]
    check((q_weight is None) == (k_weight is None), _OP, "give both q_weight and k_weight, or neither")
    check((txt_q_weight is None) == (txt_k_weight is None), _OP,
          "give both txt_q_weight and txt_k_weight, or neither")
    check(qt is not None or (txt_q_weight is None and txt_freqs is None), _OP,
          "txt_q_weight / txt_freqs given without a text stream")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("txt_q_weight", txt_q_weight),
                    ("txt_k_weight", txt_k_weight)):
        if w is not None:
            check(tuple(w.shape) == (d,), _OP, lambda: f"{name} must be (head_dim,) = ({d},), got {shape_str(w)}")
            check(w.device == qi.device, _OP, lambda: f"{name} is on {w.device}, q_img on {qi.device}")
    for name, f, x in (("img_freqs", img_freqs, qi), ("txt_freqs", txt_freqs, qt)):
        if f is not None:
            B, N = x.shape[:2]
            ok = (f.dim() == 3 and tuple(f.shape) == (N, d // 2, 2)) or (
                f.dim() == 4 and f.shape[0] in (1, B) and tuple(f.shape[1:]) == (N, d // 2, 2))
            check(ok, _OP, lambda: f"{name} must be (N, d/2, 2) = ({N}, {d // 2}, 2) or (B, N, d/2, 2), "
                                   f"got {shape_str(f)}")
            check(f.device == qi.device, _OP, lambda: f"{name} is on {f.device}, q_img on {qi.device}")
    check(d % 2 == 0 or (img_freqs is None and txt_freqs is None), _OP, lambda: f"RoPE needs an even head dim, got {d}")


def joint_attention_qk(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Optional[Tensor] = None,
                       k_txt: Optional[Tensor] = None, v_txt: Optional[Tensor] = None,
                       txt_mask: Optional[Tensor] = None, *, q_weight: Optional[Tensor] = None,
                       k_weight: Optional[Tensor] = None, txt_q_weight: Optional[Tensor] = None,
                       txt_k_weight: Optional[Tensor] = None, img_freqs: Optional[Tensor] = None,
                       txt_freqs: Optional[Tensor] = None, eps: float = 1e-6, interleaved: bool = True,
                       scale: Optional[float] = None, layout: str = "bnhd", backend: Optional[str] = None) -> Pair:
    """Per-stream QK RMSNorm (weights (d,), optional) and RoPE (tables (N, d/2, 2) or (B, N, d/2, 2) float32,
    optional) of q and k, then joint attention — what an MMDiT block's attention does after its QKV
    projections. On the fast path the norm and the rotation happen inside the attention kernel as q and k
    are loaded (and their backward as dq and dk are written); on the reference path they are
    :func:`fastdit.ops.qk_norm_rope` followed by SDPA; under ``"auto"`` :func:`attention_path` picks one of
    those or the QK-norm/RoPE kernel followed by the attention kernel. Returns ``(out_img, out_txt)``."""
    (qi, ki, vi, qt, kt, vt), mask, scale_value = _check_and_canonicalize(
        q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale, layout)
    _check_qk_extras(qi, qt, q_weight, k_weight, txt_q_weight, txt_k_weight, img_freqs, txt_freqs)
    tables_ok = all(f is None or f.dtype == torch.float32 for f in (img_freqs, txt_freqs))
    fused = any(t is not None for t in (q_weight, txt_q_weight, img_freqs, txt_freqs))
    path = "sdpa"
    if use_triton(_OP, backend, lambda: join_reasons(
            triton_unsupported_reason(qi),
            None if tables_ok else "RoPE tables must be float32 for the kernel"), KERNEL_READY and qi.is_cuda):
        path = attention_path(qi, qt, fused_qk=fused, backend=backend)
    return _run_path(path, qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, q_weight, k_weight, txt_q_weight,
                     txt_k_weight, scale_value, eps, interleaved, layout, backend)


def _run_path(path, qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, qwi, kwi, qwt, kwt, scale, eps, interleaved,
              layout, backend=None) -> Pair:
    """Run one of :data:`ATTENTION_PATHS` on validated (B, N, H, d) inputs (see the dispatch notes)."""
    if path == "kernel":
        return _fast_call(qi, ki, vi, qt, kt, vt, mask, img_freqs, txt_freqs, qwi, kwi, qwt, kwt, scale, eps,
                          interleaved, layout)
    from fastdit.ops.qk_norm_rotary import qk_norm_rope
    if qwi is not None or img_freqs is not None:
        qi, ki = qk_norm_rope(qi, ki, qwi, kwi, img_freqs, eps, interleaved, backend=backend)
    if qt is not None and (qwt is not None or txt_freqs is not None):
        # padded caption rows selected away first: the norm of a NaN row is NaN, and so is its backward
        # (through rstd) even where the attention's gradient is 0
        qt, kt = qk_norm_rope(_real_rows(qt, mask), _real_rows(kt, mask), qwt, kwt, txt_freqs, eps, interleaved,
                              backend=backend)
    if path == "prepass":
        return _fast_call(qi, ki, vi, qt, kt, vt, mask, None, None, None, None, None, None, scale, eps, interleaved,
                          layout)
    return _sdpa_canonical(qi, ki, vi, qt, kt, vt, mask, scale, layout)
