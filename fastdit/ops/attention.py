"""Joint image-text attention (SD3/Flux MMDiT), and plain self-attention (DiT) as its special case.

One softmax attention over the concatenation ``[text tokens, image tokens]``: every query of either
stream attends to every key of both (symmetric joint attention). Returns the image and the text
outputs separately.

Shapes (``layout="bnhd"``, as the QKV projections produce them): ``q_img, k_img, v_img: (B, N_img, H, d)``,
``q_txt, k_txt, v_txt: (B, N_txt, H, d)`` or all three None (self-attention over the image tokens).
``layout="bhnd"`` takes and returns (B, H, N, d) instead.

``txt_mask`` marks real caption tokens: a bool tensor (B, N_txt), True = real, or an integer tensor
(B,) of lengths (the first ``len`` tokens are real). Padded caption tokens get zero attention weight
as keys. As queries they still produce (finite, meaningless) outputs; callers ignore them. A sample
with no real caption tokens attends over its image tokens only.

``scale`` defaults to 1/sqrt(d). Three implementations share this signature:

- :func:`joint_attention_ref`: explicit ``softmax(Q Kᵀ · scale) V`` in float32 — the ground truth;
- :func:`joint_attention_sdpa`: PyTorch SDPA on the concatenation — the ``"reference"`` backend
  (same math, O(N) memory, what stock PyTorch code runs);
- ``torch.ops.fastdit.joint_attention``: the library op (Triton kernel once it lands).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdit.ops._common import (check, check_floating, check_same_device, compute_dtype, join_reasons,
                                 owned_outputs, shape_str, triton_device_reason, use_triton)

KERNEL_READY = False  # see fastdit.ops.adaln.KERNEL_READY
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
    check(layout in ("bnhd", "bhnd"), _OP, f"layout must be 'bnhd' or 'bhnd', got {layout!r}")
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
            check(t.dim() == 4, _OP, f"{name} must be 4-D {dims} (layout={layout!r}), got {shape_str(t)}")
            check(t.dtype == q_img.dtype, _OP, f"{name} has dtype {t.dtype} but q_img has {q_img.dtype}")
    q_img, k_img, v_img, q_txt, k_txt, v_txt = (_to_bnhd(t, layout) for t in named.values())
    B, N_img, H, d = q_img.shape
    check(N_img >= 1, _OP, "the image stream needs at least one token")
    for name, t in (("k_img", k_img), ("v_img", v_img)):
        check(t.shape == q_img.shape, _OP, f"{name} must match q_img's shape {tuple(q_img.shape)} "
                                           f"(B, N, H, d), got {tuple(t.shape)}")
    mask = None
    if q_txt is not None:
        N_txt = q_txt.shape[1]
        for name, t in (("q_txt", q_txt), ("k_txt", k_txt), ("v_txt", v_txt)):
            check(t.shape[0] == B and t.shape[2] == H and t.shape[3] == d and t.shape[1] == N_txt, _OP,
                  f"{name} must be (B, N_txt, H, d) = ({B}, {N_txt}, {H}, {d}) to match the image "
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
              f"a bool txt_mask must be (B, N_txt) = ({B}, {N_txt}), got {shape_str(txt_mask)}")
        return txt_mask
    check(not txt_mask.is_floating_point() and not txt_mask.is_complex(), _OP,
          f"txt_mask must be bool (B, N_txt) or integer lengths (B,), got dtype {txt_mask.dtype}")
    check(tuple(txt_mask.shape) == (B,), _OP,
          f"integer txt_mask holds caption lengths and must be (B,) = ({B},), got {shape_str(txt_mask)}")
    if not torch.compiler.is_compiling():  # a data-dependent check: skipped under torch.compile
        check(bool(((txt_mask >= 0) & (txt_mask <= N_txt)).all()), _OP,
              f"caption lengths must lie in [0, {N_txt}], got {txt_mask.tolist()}")
    return torch.arange(N_txt, device=txt_mask.device) < txt_mask.unsqueeze(1)


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
    """q, k, v: (B, N, H, d) concatenated; returns out (B, N, H, d) in compute dtype and lse (B, H, N)."""
    acc = compute_dtype(q)
    qh, kh, vh = (t.to(acc).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    scores = qh @ kh.transpose(-1, -2) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return (probs @ vh).transpose(1, 2), lse


def _attention_backward_math(dout, q, k, v, out, lse, key_mask, scale):
    """Recompute P from lse; dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K·s, dK = dSᵀ Q·s."""
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
    q, k, v = (_concat(a, b).transpose(1, 2) for a, b in ((qi, qt), (ki, kt), (vi, vt)))
    key_mask = _full_key_mask(mask, B, N_img, qi.device)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return _split(out.transpose(1, 2), N_txt, qt is not None, layout)


def joint_attention_sdpa(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Optional[Tensor] = None,
                         k_txt: Optional[Tensor] = None, v_txt: Optional[Tensor] = None,
                         txt_mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
                         layout: str = "bnhd") -> Pair:
    """Joint attention through ``F.scaled_dot_product_attention`` on the concatenated sequence: what
    stock PyTorch MMDiT code does (concatenate, attend, split). Same semantics as the reference."""
    tensors, mask, scale = _check_and_canonicalize(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale,
                                                   layout)
    return _sdpa_canonical(*tensors, mask, scale, layout)


# -------------------------------------------------------------------------------- torch.library op
# Inputs (B, N, H, d) with any strides; text tensors always present (N_txt may be 0); outputs
# contiguous (B, N, H, d) and the log-sum-exp (B, H, N_txt + N_img) for the backward.

@torch.library.custom_op("fastdit::joint_attention", mutates_args=())
def _joint_attention_op(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Tensor, k_txt: Tensor, v_txt: Tensor,
                        txt_mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    B, N_img = q_img.shape[:2]
    N_txt = q_txt.shape[1]
    out, lse = _attention_forward_math(torch.cat([q_txt, q_img], 1), torch.cat([k_txt, k_img], 1),
                                       torch.cat([v_txt, v_img], 1),
                                       _full_key_mask(txt_mask, B, N_img, q_img.device), scale)
    out = out.to(q_img.dtype)
    return owned_outputs((out[:, N_txt:], out[:, :N_txt], lse), (q_img, k_img, v_img, q_txt, k_txt, v_txt))


@_joint_attention_op.register_fake
def _(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale):
    B, N_img, H, _ = q_img.shape
    N = N_img + q_txt.shape[1]
    return (torch.empty_like(q_img, memory_format=torch.contiguous_format),
            torch.empty_like(q_txt, memory_format=torch.contiguous_format),
            q_img.new_empty((B, H, N), dtype=compute_dtype(q_img)))


@torch.library.custom_op("fastdit::joint_attention_backward", mutates_args=())
def _joint_attention_backward_op(do_img: Tensor, do_txt: Tensor, q_img: Tensor, k_img: Tensor, v_img: Tensor,
                                 q_txt: Tensor, k_txt: Tensor, v_txt: Tensor, o_img: Tensor, o_txt: Tensor,
                                 lse: Tensor, txt_mask: Optional[Tensor], scale: float
                                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, N_img = q_img.shape[:2]
    N_txt = q_txt.shape[1]
    cat = lambda txt, img: torch.cat([txt, img], 1)  # noqa: E731
    dq, dk, dv = _attention_backward_math(cat(do_txt, do_img), cat(q_txt, q_img), cat(k_txt, k_img),
                                          cat(v_txt, v_img), cat(o_txt, o_img), lse,
                                          _full_key_mask(txt_mask, B, N_img, q_img.device), scale)
    dq, dk, dv = (g.to(q_img.dtype) for g in (dq, dk, dv))
    grads = (dq[:, N_txt:], dk[:, N_txt:], dv[:, N_txt:], dq[:, :N_txt], dk[:, :N_txt], dv[:, :N_txt])
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


def triton_unsupported_reason(q_img: Tensor) -> Optional[str]:
    """Why the Triton kernel cannot take these (validated, (B, N, H, d)) inputs, or None."""
    return join_reasons(
        triton_device_reason(q_img),
        f"dtype {q_img.dtype}; the attention kernel takes float16, bfloat16 and float32"
        if q_img.dtype not in TRITON_DTYPES else None,
        f"head dim {q_img.shape[-1]} is not supported by the attention kernel "
        f"(supported: {', '.join(map(str, TRITON_HEAD_DIMS))})" if q_img.shape[-1] not in TRITON_HEAD_DIMS else None)


def joint_attention(q_img: Tensor, k_img: Tensor, v_img: Tensor, q_txt: Optional[Tensor] = None,
                    k_txt: Optional[Tensor] = None, v_txt: Optional[Tensor] = None,
                    txt_mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
                    layout: str = "bnhd", backend: Optional[str] = None) -> Pair:
    """Joint attention over [text, image]; returns ``(out_img, out_txt)`` (see the module docstring).

    ``backend``: ``"triton"`` runs the library op, ``"reference"`` PyTorch SDPA, ``"auto"`` picks.
    """
    (qi, ki, vi, qt, kt, vt), mask, scale_value = _check_and_canonicalize(
        q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, scale, layout)
    if use_triton(_OP, backend, lambda: triton_unsupported_reason(qi), KERNEL_READY and qi.is_cuda):
        has_txt = qt is not None
        if not has_txt:  # self-attention: an empty text stream keeps one op signature
            qt = kt = vt = qi.new_empty((qi.shape[0], 0) + tuple(qi.shape[2:]))
        o_img, o_txt, _ = torch.ops.fastdit.joint_attention(qi, ki, vi, qt, kt, vt, mask, scale_value)
        if layout == "bhnd":
            o_img, o_txt = o_img.transpose(1, 2), o_txt.transpose(1, 2)
        return o_img, (o_txt if has_txt else None)
    return _sdpa_canonical(qi, ki, vi, qt, kt, vt, mask, scale_value, layout)
