"""Attention: fastdit's joint flash-attention kernel against every SDPA backend and installed library.

Shapes (B, H, N_img + N_txt, d): ``flux`` (1, 24, 4096 + 512, 128), ``sd3`` (2, 24, 4096 + 333, 64),
``dit-xl2`` (64, 16, 256, 72), ``dit-512`` (8, 16, 1024, 64), ``long16k`` (1, 24, 16384, 128) — no text
stream for the DiT and long shapes — and the sweep ``seq1024`` … ``seq16384``: 16,384 tokens per batch
(B = 16384 / N), 16 heads of 128 (FlashAttention-3's sweep), self-attention. The report plots TFLOP/s
against the ``seq*`` shapes.

Cases (``fwd``: under ``no_grad``; ``fwd+bwd``: forward, then ``autograd.grad`` of every q, k, v (and
QK-norm weight) with fixed random cotangents):

- ``attention.<dir>``: the attention alone, unmasked over [caption, image] (what Flux and SD3 code runs:
  their captions attend over padding). ``fastdit``: ``joint_attention(..., backend="triton")`` on separate
  image/text q, k, v — (B, N, H, d) views of each stream's fused QKV projection, as the module makes them.
  ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` / ``sdpa-math``: ``F.scaled_dot_product_attention``
  under ``sdpa_kernel(<backend>)`` on contiguous (B, H, N, d) tensors with the caption already
  concatenated (concatenation and transposes untimed: SDPA's most favourable case). ``flash-attn``
  (``flash_attn.flash_attn_func``) and ``xformers`` (``memory_efficient_attention``): (B, N, H, d)
  contiguous, concatenated.
- ``attention.masked.<dir>`` (joint shapes): caption padding masked — every other sample, the first
  included, has 37 padded caption tokens (2 at the quick shapes). ``fastdit`` takes ``txt_mask`` as
  caption lengths; ``sdpa-cudnn-masked`` / ``sdpa-efficient-masked`` / ``sdpa-math-masked`` a bool
  ``attn_mask`` (B, 1, 1, N). Padded caption queries' output rows mean nothing by contract and are left
  out of the check (their cotangents are zero).
- ``attention_qk.<dir>``: per-stream QK RMSNorm (fp32 weights) + RoPE on the image tokens + joint attention,
  as an MMDiT block runs it: ``fastdit`` is ``joint_attention_qk`` (norm and rotation fused into the
  kernel's loads); ``eager`` / ``compile`` / ``compile-max-autotune`` the stock code (``F.rms_norm``, Flux's
  ``apply_rope``, ``torch.cat``, SDPA).

FLOPs, N = N_img + N_txt (padded caption keys count as work, for every peer alike): forward
4·B·H·N²·d, fwd+bwd 3.5 × that (backward = 2.5 × forward). Check: the normwise 2× rule for every output
and gradient, against a float64 reference computed in query chunks (the same-dtype reference is
fastdit's ``backend="reference"``: SDPA on the concatenation).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdit.bench.registry import Case, Peer, Workload, register
from fastdit.bench.stock import (apply_rope, check_normwise, compiled, CPU_GPU_ONLY, flatten, guard_size, MAX_AUTOTUNE,
                                 max_autotune_peer, on_gpu, optional_import, rope_rotation, triton_skip)
from fastdit.ops import joint_attention, joint_attention_qk, qk_norm_rope_ref, rope_freqs_2d

GROUP = "attention"
DIRECTIONS = ("fwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "fwd+bwd": 3.5}
CAPTION_PADDING = 37

SHAPES: Dict[str, tuple] = {  # (B, H, N_img, N_txt, d)
    "flux": (1, 24, 4096, 512, 128),
    "sd3": (2, 24, 4096, 333, 64),
    "dit-xl2": (64, 16, 256, 0, 72),
    "dit-512": (8, 16, 1024, 0, 64),
    "long16k": (1, 24, 16384, 0, 128),
    **{f"seq{n}": (16384 // n, 16, n, 0, 128) for n in (1024, 2048, 4096, 8192, 16384)},
}
QUICK: Dict[str, tuple] = {"flux": (1, 2, 8, 3, 64), "dit-xl2": (2, 2, 9, 0, 72), "seq1024": (2, 2, 16, 0, 64)}
MASKED_SHAPES = {k: v for k, v in SHAPES.items() if v[3] > 0}
MASKED_QUICK = {"flux": (2, 2, 8, 5, 64)}
QK_SHAPES = {k: SHAPES[k] for k in ("flux", "sd3", "dit-xl2", "dit-512", "long16k")}
QK_QUICK = {"flux": (1, 2, 8, 3, 64), "dit-xl2": (1, 2, 9, 0, 72)}

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
CPU_SDPA = ("sdpa-flash", "sdpa-math")  # the backends PyTorch has on the CPU
MASKED_SDPA = ("sdpa-cudnn", "sdpa-efficient", "sdpa-math")  # flash takes no attn_mask


def dims(p) -> str:
    B, H, N_img, N_txt, d = p
    tokens = f"N={N_img}+{N_txt}" if N_txt else f"N={N_img}"
    return f"B={B} H={H} {tokens} d={d}"


def attention_flops(p, direction: str) -> float:
    B, H, N_img, N_txt, d = p
    return FLOP_FACTOR[direction] * 4.0 * B * H * (N_img + N_txt) ** 2 * d


def grid(n: int):
    """rows x cols = n with rows the largest divisor of n not above sqrt(n) (image tokens in row-major order)."""
    rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
    return rows, n // rows


def caption_lengths(B: int, N_txt: int, pad: int, device) -> Tensor:
    """(B,) real caption tokens: samples 0, 2, 4, ... have ``pad`` padded tokens."""
    return torch.tensor([max(1, N_txt - pad) if i % 2 == 0 else N_txt for i in range(B)], dtype=torch.int64,
                        device=device)


def qkv_views(ctx, B: int, N: int, H: int, d: int) -> List[Tensor]:
    """q, k, v (B, N, H, d): views of one fused projection output (B, N, 3, H, d), requiring grad."""
    return [t.requires_grad_() for t in ctx.randn(B, N, 3, H, d).unbind(2)]


# ------------------------------------------------------------------------------------ float64 reference

def attention64(qi, ki, vi, qt, kt, vt, key_mask: Optional[Tensor], cotangents: Optional[Sequence[Tensor]]):
    """softmax(Q Kᵀ/√d + mask) V over [text, image] in float64, in query chunks of ≤ 2²⁷ scores (the
    full score matrix of a 16k-token shape would not fit). (B, N, H, d) inputs; returns (outputs in the
    common order [img, txt], grads [dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt] or [])."""
    L = 0 if qt is None else qt.shape[1]

    def cat(img, txt):
        t = img if txt is None else torch.cat([txt, img], 1)
        return t.detach().double().transpose(1, 2).contiguous()

    q, k, v = cat(qi, qt), cat(ki, kt), cat(vi, vt)
    B, H, N, d = q.shape
    grads = cotangents is not None
    bias = None
    if key_mask is not None:
        full = torch.cat([key_mask, key_mask.new_ones(B, N - L)], 1)
        bias = torch.zeros(B, 1, 1, N, dtype=torch.float64, device=q.device).masked_fill(~full[:, None, None, :],
                                                                                      float("-inf"))
    if grads:
        do_img, do_txt = cotangents[0], (cotangents[1] if L else None)
        do = cat(do_img, do_txt)
        k.requires_grad_()
        v.requires_grad_()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    out = torch.empty_like(q)
    chunk = max(1, 2**27 // (B * H * N))
    for s in range(0, N, chunk):
        with torch.enable_grad() if grads else torch.no_grad():
            qc = q[:, :, s:s + chunk].detach().requires_grad_(grads)
            scores = (qc @ k.transpose(-1, -2)) * d ** -0.5
            if bias is not None:
                scores = scores + bias
            oc = scores.softmax(-1) @ v
        out[:, :, s:s + chunk] = oc.detach()
        if grads:
            gq, gk, gv = torch.autograd.grad(oc, [qc, k, v], do[:, :, s:s + chunk])
            dq[:, :, s:s + chunk] = gq
            dk += gk
            dv += gv
        del scores, oc

    def split(t):
        t = t.transpose(1, 2)
        return [t[:, L:], t[:, :L]] if L else [t[:, L:]]

    outs = split(out)
    if not grads:
        return outs, []
    gi, gt = zip(*(split(g) for g in (dq, dk, dv))) if L else ([split(g)[0] for g in (dq, dk, dv)], ())
    return outs, list(gi) + list(gt)


def _names(joint: bool, weights: int = 0) -> List[str]:
    outs = ["o_img", "o_txt"] if joint else ["o_img"]
    ins = ["q_img", "k_img", "v_img"] + (["q_txt", "k_txt", "v_txt"] if joint else [])
    ins += ["q_weight", "k_weight", "txt_q_weight", "txt_k_weight"][:weights]
    return outs + [f"d{n}" for n in ins]


def _run_lp(direction, fn, inputs, cotangents):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.set_grad_enabled(direction != "fwd"):
        outs = [o for o in fn(*leaves) if o is not None]
    grads = torch.autograd.grad(outs, leaves, list(cotangents)) if direction != "fwd" else ()
    return [o.detach() for o in outs] + [g.detach() for g in grads]


# ------------------------------------------------------------------------------------------ conversions

def _to_common(direction: str, run: Callable[[], Any], layout: str, L: int) -> Callable[[], Any]:
    """Wrap a concatenated-sequence peer so its result has fastdit's form: outputs [o_img, o_txt] and grads
    [dq_img, dk_img, dv_img, dq_txt, dk_txt, dv_txt] ((B, N, H, d) views: no copies in the timed call)."""
    def split(t):
        t = t.transpose(1, 2) if layout == "bhnd" else t
        return (t[:, L:], t[:, :L]) if L else (t,)

    def common():
        result = run()
        if direction == "fwd":
            return split(result[0])
        outs, grads = result
        parts = [split(g) for g in grads]
        return split(outs[0]), tuple(p[0] for p in parts) + (tuple(p[1] for p in parts) if L else ())
    return common


def _concatenated(inputs: Sequence[Tensor], L: int, layout: str) -> List[Tensor]:
    """Fresh contiguous q, k, v leaves over [text, image] in ``layout`` (made at build time, untimed)."""
    joint = L > 0
    qi, ki, vi = inputs[:3]
    qt, kt, vt = inputs[3:6] if joint else (None, None, None)
    out = []
    for img, txt in ((qi, qt), (ki, kt), (vi, vt)):
        t = torch.cat([txt, img], 1) if joint else img
        t = t.transpose(1, 2) if layout == "bhnd" else t
        out.append(t.detach().contiguous().requires_grad_())
    return out


def _cotangent_concat(cotangents: Sequence[Tensor], L: int, layout: str) -> Tensor:
    t = torch.cat([cotangents[1], cotangents[0]], 1) if L else cotangents[0]
    return (t.transpose(1, 2) if layout == "bhnd" else t).contiguous()


def _direction(direction, forward, inputs, cotangents):
    inputs = list(inputs)
    if direction == "fwd":
        def run():
            with torch.no_grad():
                return tuple(o for o in forward(*inputs) if o is not None)
        return run

    def run():
        outs = tuple(o for o in forward(*inputs) if o is not None)
        return outs, torch.autograd.grad(outs, inputs, list(cotangents))
    return run


def _sdpa_peer(name: str, backend: str, direction: str, inputs, cotangents, L: int, mask: Optional[Tensor]):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, backend)

    def forward(q, k, v):
        with sdpa_kernel(which):
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask),)

    def build():
        leaves = _concatenated(inputs, L, "bhnd")
        cot = [_cotangent_concat(cotangents, L, "bhnd")]
        return _to_common(direction, _direction(direction, forward, leaves, cot), "bhnd", L)
    return Peer(name, build)


def _library_peer(name: str, direction: str, inputs, cotangents, L: int, ctx) -> Peer:
    module, reason = optional_import("flash_attn" if name == "flash-attn" else "xformers.ops")
    if module is None:
        return Peer(name, None, reason)
    if not on_gpu(ctx):
        return Peer(name, None, f"{name} {CPU_GPU_ONLY}")
    attend = module.flash_attn_func if name == "flash-attn" else module.memory_efficient_attention

    def forward(q, k, v):
        out = attend(q, k, v)
        return (out[0] if isinstance(out, tuple) else out,)

    def build():
        leaves = _concatenated(inputs, L, "bnhd")
        cot = [_cotangent_concat(cotangents, L, "bnhd")]
        return _to_common(direction, _direction(direction, forward, leaves, cot), "bnhd", L)
    return Peer(name, build)


def _sdpa_math_skip(ctx, p, direction) -> Optional[str]:
    B, H, N_img, N_txt, _ = p
    need = 4 * B * H * (N_img + N_txt) ** 2 * (4 if direction == "fwd+bwd" else 2)
    if need > ctx.memory_bytes:
        return (f"the math backend materialises the N² scores: about {need / 2**30:.0f} GiB here, more than the "
                f"{ctx.memory_bytes / 2**30:.0f} GiB available")
    return None


def _sdpa_peers(ctx, direction, inputs, cotangents, L, p, mask=None, suffix="", names=None) -> List[Peer]:
    peers = []
    for name in names or SDPA_BACKENDS:
        full = name + suffix
        skip = None
        if not on_gpu(ctx) and name not in CPU_SDPA:
            skip = f"the {SDPA_BACKENDS[name].lower()} SDPA backend is CUDA-only"
        elif name == "sdpa-math":
            skip = _sdpa_math_skip(ctx, p, direction)
        peers.append(Peer(full, None, skip) if skip else
                     _sdpa_peer(full, SDPA_BACKENDS[name], direction, inputs, cotangents, L, mask))
    return peers


# ------------------------------------------------------------------------------------------ the workloads

def _inputs(ctx, p):
    B, H, N_img, N_txt, d = p
    guard_size(ctx, 3 * B * H * (N_img + N_txt) * d, f"attention {dims(p)}")
    inputs = qkv_views(ctx, B, N_img, H, d) + (qkv_views(ctx, B, N_txt, H, d) if N_txt else [])
    cotangents = [ctx.randn(B, N_img, H, d)] + ([ctx.randn(B, N_txt, H, d)] if N_txt else [])
    return inputs, cotangents


def _fastdit_forward(joint: bool, txt_mask=None, backend: str = "triton"):
    def forward(*qkv):
        return joint_attention(*qkv, txt_mask=txt_mask, backend=backend) if joint else \
            joint_attention(*qkv, backend=backend)
    return forward


def make_attention(direction: str, masked: bool = False):
    def make(ctx, shape: str, p) -> Workload:
        B, H, N_img, N_txt, d = p
        joint = N_txt > 0
        inputs, cotangents = _inputs(ctx, p)
        lengths = real = None
        if masked:
            pad = CAPTION_PADDING if on_gpu(ctx) and N_txt > CAPTION_PADDING else max(1, N_txt // 2)
            lengths = caption_lengths(B, N_txt, pad, ctx.device)
            real = torch.arange(N_txt, device=ctx.device)[None] < lengths[:, None]  # (B, N_txt) True = real
            cotangents[1] = cotangents[1] * real[:, :, None, None].to(cotangents[1].dtype)
        skip = triton_skip(ctx)
        fast = _fastdit_forward(joint, lengths)
        peers = [Peer("fastdit", None, skip) if skip else
                 Peer("fastdit", lambda: _direction(direction, fast, inputs, cotangents))]
        if masked:
            key_mask = torch.cat([real, real.new_ones(B, N_img)], 1)[:, None, None, :]
            peers += _sdpa_peers(ctx, direction, inputs, cotangents, N_txt, p, key_mask, "-masked", MASKED_SDPA)
        else:
            peers += _sdpa_peers(ctx, direction, inputs, cotangents, N_txt, p)
            peers += [_library_peer(name, direction, inputs, cotangents, N_txt, ctx) for name in ("flash-attn", "xformers")]
        names = _names(joint)
        if direction == "fwd":
            names = names[:len(cotangents)]

        def reference():
            lp = _run_lp(direction, _fastdit_forward(joint, lengths, "reference"), inputs, cotangents)
            outs, grads = attention64(*inputs[:3], *(inputs[3:6] if joint else (None,) * 3), real,
                                      None if direction == "fwd" else cotangents)
            hi = outs + grads
            if masked:  # padded caption queries' rows are meaningless by contract: left out of the check
                lp[1], hi[1] = (t * real[:, :, None, None].to(t.dtype) for t in (lp[1], hi[1]))
            return {"lp": lp, "hi": hi, "names": names}

        def flat(result):
            got = flatten(direction, result)
            if masked:
                got[1] = got[1] * real[:, :, None, None].to(got[1].dtype)
            return got

        name = f"attention.masked.{direction}" if masked else f"attention.{direction}"
        label = dims(p) + (f" caption lengths {lengths.tolist()}" if masked and B <= 8 else "")
        return Workload(group=GROUP, name=name, shape=shape, dims=label, peers=peers,
                        flops=attention_flops(p, direction), reference=reference,
                        check=check_normwise(flat))
    return make


# ------------------------------------------------------------------------ QK-norm + RoPE + attention

def stock_qk_attention(rot: Optional[Tensor], joint: bool, eps: float = 1e-6) -> Callable:
    """Stock MMDiT code after the QKV projections: ``F.rms_norm`` per head, Flux's RoPE on image tokens,
    ``torch.cat`` [text, image], SDPA (default dispatch), split. (B, N, H, d) in and out."""
    def norm(t, w):
        return F.rms_norm(t.transpose(1, 2), (t.shape[-1],), w, eps=eps)  # (B, H, N, d)

    def forward(qi, ki, vi, *rest):
        if joint:
            qt, kt, vt, qw, kw, tqw, tkw = rest
        else:
            qw, kw = rest
        q, k = norm(qi, qw), norm(ki, kw)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        v = vi.transpose(1, 2)
        if not joint:
            return (F.scaled_dot_product_attention(q, k, v).transpose(1, 2),)
        q = torch.cat([norm(qt, tqw), q], 2)
        k = torch.cat([norm(kt, tkw), k], 2)
        v = torch.cat([vt.transpose(1, 2), v], 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        L = qt.shape[1]
        return out[:, L:], out[:, :L]
    return forward


def fastdit_qk_attention(freqs: Tensor, joint: bool, backend: str = "triton", eps: float = 1e-6) -> Callable:
    def forward(qi, ki, vi, *rest):
        if joint:
            qt, kt, vt, qw, kw, tqw, tkw = rest
            return joint_attention_qk(qi, ki, vi, qt, kt, vt, q_weight=qw, k_weight=kw, txt_q_weight=tqw,
                                      txt_k_weight=tkw, img_freqs=freqs, eps=eps, backend=backend)
        qw, kw = rest
        return joint_attention_qk(qi, ki, vi, q_weight=qw, k_weight=kw, img_freqs=freqs, eps=eps,
                                  backend=backend)[:1]
    return forward


def qk_reference64(inputs: Sequence[Tensor], freqs: Tensor, joint: bool, cotangents, eps: float = 1e-6):
    """float64: ``qk_norm_rope_ref`` per stream (autograd), the chunked attention, then back through the norm."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    if joint:
        qi, ki, vi, qt, kt, vt, qw, kw, tqw, tkw = leaves
    else:
        qi, ki, vi, qw, kw = leaves
        qt = kt = vt = tqw = tkw = None
    with torch.enable_grad():
        qni, kni = qk_norm_rope_ref(qi, ki, qw, kw, freqs, eps)
        qnt, knt = qk_norm_rope_ref(qt, kt, tqw, tkw, None, eps) if joint else (None, None)
    outs, grads = attention64(qni, kni, vi, qnt, knt, vt, None, cotangents)
    if cotangents is None:
        return outs
    normed = [qni, kni] + ([qnt, knt] if joint else [])
    normed_grads = [grads[0], grads[1]] + ([grads[3], grads[4]] if joint else [])
    sources = [qi, ki] + ([qt, kt] if joint else []) + [qw, kw] + ([tqw, tkw] if joint else [])
    back = torch.autograd.grad(normed, sources, normed_grads)
    if joint:
        dqi, dki, dqt, dkt, dqw, dkw, dtqw, dtkw = back
        return outs + [dqi, dki, grads[2], dqt, dkt, grads[5], dqw, dkw, dtqw, dtkw]
    dqi, dki, dqw, dkw = back
    return outs + [dqi, dki, grads[2], dqw, dkw]


def make_qk(direction: str):
    def make(ctx, shape: str, p) -> Workload:
        B, H, N_img, N_txt, d = p
        joint = N_txt > 0
        inputs, cotangents = _inputs(ctx, p)
        inputs += [(1 + 0.1 * ctx.randn(d, dtype=torch.float32)).requires_grad_() for _ in range(4 if joint else 2)]
        freqs = rope_freqs_2d(*grid(N_img), d, device=ctx.device)
        rot = rope_rotation(freqs)
        stock = stock_qk_attention(rot, joint)
        skip = triton_skip(ctx)
        fast = fastdit_qk_attention(freqs, joint)
        peers = [Peer("fastdit", None, skip) if skip else
                 Peer("fastdit", lambda: _direction(direction, fast, inputs, cotangents)),
                 Peer("eager", lambda: _direction(direction, stock, inputs, cotangents)),
                 Peer("compile", lambda: _direction(direction, compiled(stock), inputs, cotangents))]
        peers.append(max_autotune_peer(ctx, lambda: _direction(direction, compiled(stock, mode=MAX_AUTOTUNE),
                                                               inputs, cotangents)))
        names = _names(joint, 4 if joint else 2)
        if direction == "fwd":
            names = names[:len(cotangents)]

        def reference():
            lp = _run_lp(direction, fastdit_qk_attention(freqs, joint, "reference"), inputs, cotangents)
            hi = qk_reference64(inputs, freqs, joint, None if direction == "fwd" else cotangents)
            return {"lp": lp, "hi": hi, "names": names}

        return Workload(group=GROUP, name=f"attention_qk.{direction}", shape=shape, dims=dims(p), peers=peers,
                        flops=attention_flops(p, direction), reference=reference,
                        check=check_normwise(lambda result: flatten(direction, result)))
    return make


ATTENTION_PEERS = ("fastdit", *SDPA_BACKENDS, "flash-attn", "xformers")
for _direction_name in DIRECTIONS:
    register(Case(group=GROUP, name=f"attention.{_direction_name}", shapes=dict(SHAPES), quick_shapes=dict(QUICK),
                  make=make_attention(_direction_name), peers=ATTENTION_PEERS))
for _direction_name in DIRECTIONS:
    register(Case(group=GROUP, name=f"attention.masked.{_direction_name}", shapes=dict(MASKED_SHAPES),
                  quick_shapes=dict(MASKED_QUICK), make=make_attention(_direction_name, masked=True),
                  peers=("fastdit", *(n + "-masked" for n in MASKED_SDPA))))
for _direction_name in DIRECTIONS:
    register(Case(group=GROUP, name=f"attention_qk.{_direction_name}", shapes=dict(QK_SHAPES),
                  quick_shapes=dict(QK_QUICK), make=make_qk(_direction_name),
                  peers=("fastdit", "eager", "compile", "compile-max-autotune")))
