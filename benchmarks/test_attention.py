"""Joint (MMDiT) and self-attention (DiT): fastdit's kernel against PyTorch SDPA's backends and any
installed attention library, then the fused QK-norm + RoPE + attention op and the whole attention module
against stock PyTorch eager and torch.compile — every peer in one process.

Shapes (B, H, N_img + N_txt, d): flux1024 (1, 24, 4096+512, 128), sd3_1024 (2, 24, 4096+154, 64) [joint:
caption padding masked, sample 0 of each pair has 37 padded caption tokens]; dit-xl256 (64, 16, 256, 72),
dit512 (8, 16, 1024, 64), long (1, 24, 16384, 128) [self-attention, no text stream].

FLOPs, N = N_img + N_txt (padded caption keys are counted as work, for every peer alike):
attention fwd = 4·B·H·N²·d, bwd = 2.5 × fwd, fwd+bwd = 3.5 × fwd; the module adds its projections,
8·B·N·D² forward (D = H·d), twice that backward. bwd is ``autograd.grad`` over a retained graph.

1. ``test_attention_kernel`` (group ``attention.<direction>``): the attention alone.
   - ``sdpa-cudnn`` / ``sdpa-flash`` / ``sdpa-efficient``: ``F.scaled_dot_product_attention`` under
     ``sdpa_kernel(<backend>)`` on contiguous (B, H, N, d) tensors with the text already concatenated
     (concatenation and transposes are not timed: the most favourable case for SDPA). Joint shapes
     pass the caption padding as a bool ``attn_mask`` (B, 1, 1, N) where the backend takes one; flash
     takes none, and a backend that refuses the mask is timed unmasked: ``extra["mask"]`` says which.
     A backend that refuses the inputs altogether is skipped with its error text.
   - ``flash-attn2`` (``flash_attn.flash_attn_func``), ``flash-attn3`` (``flash_attn_interface``),
     ``xformers`` (``memory_efficient_attention``): (B, N, H, d) contiguous, text concatenated,
     unmasked; skipped where not installed.
   - ``fastdit-triton`` (``fastdit-op-reference-math`` until ``attention.KERNEL_READY``):
     ``joint_attention(..., backend="triton")`` on separate image/text q, k, v — (B, N, H, d) views of
     each stream's fused QKV projection, as the module produces them — with ``txt_mask`` as caption
     lengths (``FASTDIT_BENCH_TXT_MASK=bool``: a (B, N_txt) bool mask); its output is checked against
     SDPA first (``extra["rel_err"]``, image and real caption tokens).
   - ``fastdit-reference-sdpa``: ``joint_attention(..., backend="reference")`` on the same views:
     concatenate, SDPA (default dispatch, masked), split — what fastdit runs without its kernel.
2. ``test_attention_qk`` (group ``attention_qk.<direction>``): per-stream QK RMSNorm + RoPE (image
   tokens) + joint attention + split, from the QKV views: ``joint_attention_qk`` (one fused op) against
   stock PyTorch (``F.rms_norm``, Flux's ``apply_rope``, ``torch.cat``, SDPA) eager and compiled, and
   against fastdit's two ops (``qk_norm_rope`` then ``joint_attention``). Bytes/FLOPs: the attention's.
3. ``test_attention_module`` (group ``attention_module.<direction>``): ``JointAttention`` (per-stream
   QKV projection, QK-norm, RoPE on image tokens, joint attention, split, per-stream output projection)
   in bf16, against the same module written in stock PyTorch with the same weights, eager and
   ``torch.compile(dynamic=False)``. fwd+bwd takes gradients of the inputs and every parameter.

Non-fastdit peers run even before the kernel lands; fastdit's reference math is O(N²) in memory, so its
cases whose float32 score matrix exceeds 8 GiB are skipped until ``KERNEL_READY``.
"""
import os
import warnings

import pytest
import torch
import torch._dynamo.config
import torch.nn.functional as F
from harness import direction_builder
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastdit.ops
from fastdit.modules.attention import JointAttention
from fastdit.ops import attention as attention_ops
from fastdit.ops import joint_attention, qk_norm_rope, rope_freqs_2d, set_attention_path

# Every peer is compiled once per shape and direction (grad mode is a guard): more than dynamo's default
# of 8 recompilations of one code object, after which it would silently run eager.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, max(getattr(torch._dynamo.config, _name), 64))

SHAPES = {  # name: (B, H, N_img, N_txt, d); N_txt = 0 is self-attention
    "flux1024": (1, 24, 4096, 512, 128),
    "sd3_1024": (2, 24, 4096, 154, 64),
    "dit-xl256": (64, 16, 256, 0, 72),
    "dit512": (8, 16, 1024, 0, 64),
    "long": (1, 24, 16384, 0, 128),
}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
CAPTION_PADDING = 37       # padded caption tokens in every other sample of the joint shapes
# the txt_mask form fastdit gets: "lengths" (B,) int64 or "bool" (B, N_txt) (lengths are range-checked on the
# host, a device sync that also keeps the call out of a CUDA graph; set FASTDIT_BENCH_TXT_MASK=bool to compare)
FASTDIT_TXT_MASK = os.environ.get("FASTDIT_BENCH_TXT_MASK", "lengths")
REFERENCE_MATH_LIMIT = 8 * 2**30  # bytes of one float32 score matrix the O(N²) reference math may build
EPS = 1e-6

FASTDIT = "fastdit-triton" if attention_ops.KERNEL_READY else "fastdit-op-reference-math"
FASTDIT_2OPS = "fastdit-triton-2ops" if attention_ops.KERNEL_READY else "fastdit-2ops-reference-math"
SDPA_BACKENDS = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
ALTERNATIVES = ["flash-attn2", "flash-attn3", "xformers"]
KERNEL_IMPLS = [*SDPA_BACKENDS, *ALTERNATIVES, FASTDIT, "fastdit-reference-sdpa"]
QK_IMPLS = ["eager-stock", "compile-stock", "fastdit-reference", FASTDIT_2OPS, FASTDIT]
# fastdit-path-*: backend "auto" with attention_path forced (prepass: QK-norm/RoPE kernel, then the kernel;
# sdpa: QK-norm/RoPE kernel, then SDPA); FASTDIT: backend "triton", QK-norm/RoPE fused into the kernel
MODULE_IMPLS = ["eager-stock", "compile-stock", "fastdit-reference", FASTDIT, "fastdit-path-prepass",
                "fastdit-path-sdpa"]


# ------------------------------------------------------------------------------------------ helpers

def shape_label(name):
    B, H, N_img, N_txt, d = SHAPES[name]
    return f"{name} {B}x{H}x{N_img}+{N_txt}x{d}" if N_txt else f"{name} {B}x{H}x{N_img}x{d}"


def attention_flops(name):
    B, H, N_img, N_txt, d = SHAPES[name]
    return 4.0 * B * H * (N_img + N_txt) ** 2 * d


def caption_lengths(B, N_txt):
    """(B,) real caption tokens: every other sample (the first included) has CAPTION_PADDING padded."""
    lengths = [max(1, N_txt - CAPTION_PADDING) if i % 2 == 0 else N_txt for i in range(B)]
    return torch.tensor(lengths, dtype=torch.int64, device="cuda")


def real_caption_tokens(lengths, N_txt):
    """(B, N_txt) bool, True = real caption token."""
    return torch.arange(N_txt, device=lengths.device) < lengths[:, None]


def fastdit_txt_mask(lengths, N_txt):
    return lengths if FASTDIT_TXT_MASK == "lengths" else real_caption_tokens(lengths, N_txt)


def sdpa_key_mask(lengths, N_txt, N_img):
    """(B, 1, 1, N_txt + N_img) bool over the keys of [text, image], True = attend."""
    real = real_caption_tokens(lengths, N_txt)
    return torch.cat([real, real.new_ones(real.shape[0], N_img)], dim=1)[:, None, None, :]


def qkv_views(randn, B, N, H, d):
    """q, k, v (B, N, H, d): views of one fused projection output (B, N, 3, H, d), requiring grad."""
    return [t.requires_grad_() for t in randn(B, N, 3, H, d).unbind(2)]


def refusal(build):
    """Run the timed callable once (compilation, autotuning, and whether the backend takes these inputs at
    all): None, or why it cannot run, with the warnings that explain an SDPA refusal."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            build()()
            torch.cuda.synchronize()
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
            reason = f"{type(err).__name__}: {' '.join(str(err).split())[:600]}"
        else:
            return None
    notes = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
    torch.cuda.empty_cache()
    return reason + (f" [warnings: {notes[:1500]}]" if notes else "")


def skip_reference_math_oom(impl, name):
    B, H, N_img, N_txt, _ = SHAPES[name]
    score_bytes = 4 * B * H * (N_img + N_txt) ** 2
    if impl in (FASTDIT, FASTDIT_2OPS) and not attention_ops.KERNEL_READY and score_bytes > REFERENCE_MATH_LIMIT:
        pytest.skip(f"attention.KERNEL_READY is False: the op's O(N²) reference math would build "
                    f"{score_bytes / 2**30:.0f} GiB float32 score matrices")


def relative_error(got, want, lengths=None):
    """‖got − want‖ / ‖want‖ over image outputs and real caption tokens' outputs (padded caption queries
    produce meaningless values by contract)."""
    num = den = 0.0
    for index, (g, w) in enumerate(zip(got, want)):
        if index == 1 and lengths is not None:
            real = real_caption_tokens(lengths, g.shape[1])
            g, w = g[real], w[real]
        num += (g.float() - w.float()).square().sum().item()
        den += w.float().square().sum().item()
    return (num / max(den, 1e-30)) ** 0.5


def check_against(impl, got, want, lengths, tolerance):
    err = relative_error(got, want, lengths)
    assert err < tolerance, f"{impl}: relative error {err:.3g} against stock PyTorch exceeds {tolerance}"
    return round(err, 6)


# ------------------------------------------------------------------------- 1. attention kernels alone

def sdpa_forward(backend):
    def forward(q, k, v, attn_mask):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return forward


def alternative_forward(impl):
    """(B, N, H, d) -> (B, N, H, d) forward of an installed library, or the reason it is unavailable."""
    try:
        if impl == "flash-attn2":
            from flash_attn import flash_attn_func
        elif impl == "flash-attn3":
            from flash_attn_interface import flash_attn_func
        else:
            from xformers.ops import memory_efficient_attention as flash_attn_func
    except Exception as err:  # ImportError, or a broken build failing at import
        return None, f"{impl} is not available: {type(err).__name__}: {err}"

    def forward(q, k, v):
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some flash_attn_interface versions add the lse
    return forward, None


def fastdit_attention_forward(backend, joint, txt_mask):
    if joint:
        def forward(q_img, k_img, v_img, q_txt, k_txt, v_txt):
            return joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_mask, backend=backend)
    else:
        def forward(q_img, k_img, v_img):
            return joint_attention(q_img, k_img, v_img, backend=backend)[:1]
    return forward


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("direction", list(FLOP_FACTOR))
def test_attention_kernel(gpu_bench, randn, direction, impl, shape):
    B, H, N_img, N_txt, d = SHAPES[shape]
    N, joint = N_img + N_txt, N_txt > 0
    kwargs = dict(group=f"attention.{direction}", impl=impl, shape=shape_label(shape),
                  flops=FLOP_FACTOR[direction] * attention_flops(shape))
    lengths = caption_lengths(B, N_txt) if joint else None
    if joint:
        kwargs["caption_lengths"] = lengths.tolist()

    if impl in SDPA_BACKENDS:
        q, k, v = (randn(B, H, N, d, requires_grad=True) for _ in range(3))
        forward = sdpa_forward(SDPA_BACKENDS[impl])

        def build_with(mask):
            return direction_builder(direction, forward, [q, k, v], (mask,))

        mask = None
        if joint and impl == "sdpa-flash":
            kwargs["mask"] = "none: the flash backend takes no attn_mask (caption padding attended)"
        elif joint:
            mask = sdpa_key_mask(lengths, N_txt, N_img)
            kwargs["mask"] = "bool attn_mask (B, 1, 1, N)"
        reason = refusal(build_with(mask))
        if reason and mask is not None:
            kwargs["mask"] = f"none: the masked call was refused ({reason[:400]})"
            mask = None
            reason = refusal(build_with(mask))
        if reason:
            pytest.skip(f"{impl} refuses {shape_label(shape)}: {reason}")
        kwargs["inputs"] = "(B, H, N, d) contiguous, text concatenated (untimed)"
        gpu_bench(build_with(mask), **kwargs)
        return

    if impl in ALTERNATIVES:
        forward, reason = alternative_forward(impl)
        if forward is None:
            pytest.skip(reason)
        q, k, v = (randn(B, N, H, d, requires_grad=True) for _ in range(3))
        build = direction_builder(direction, forward, [q, k, v])
        reason = refusal(build)
        if reason:
            pytest.skip(f"{impl} refuses {shape_label(shape)}: {reason}")
        kwargs["inputs"] = "(B, N, H, d) contiguous, text concatenated (untimed)"
        if joint:
            kwargs["mask"] = "none: timed unmasked (caption padding attended)"
        gpu_bench(build, **kwargs)
        return

    skip_reference_math_oom(impl, shape)
    inputs = qkv_views(randn, B, N_img, H, d) + (qkv_views(randn, B, N_txt, H, d) if joint else [])
    txt_mask = fastdit_txt_mask(lengths, N_txt) if joint else None
    backend = "triton" if impl == FASTDIT else "reference"
    forward = fastdit_attention_forward(backend, joint, txt_mask)
    build = direction_builder(direction, forward, inputs)
    reason = refusal(build)
    if reason:
        pytest.skip(f"{impl} refuses {shape_label(shape)}: {reason}")
    if impl == FASTDIT:
        with torch.no_grad():
            kwargs["rel_err"] = check_against(impl, forward(*inputs),
                                              fastdit_attention_forward("reference", joint, txt_mask)(*inputs),
                                              lengths, tolerance=2e-2)
    kwargs["inputs"] = "(B, N, H, d) views of per-stream fused QKV, streams separate"
    if joint:
        kwargs["mask"] = f"txt_mask as {FASTDIT_TXT_MASK}"
    gpu_bench(build, **kwargs)


# ------------------------------------------------------------------ 2. QK-norm + RoPE + joint attention

def stock_rope_table(freqs):
    """Flux's ``EmbedND`` output: (N, d/2, 2, 2) rotation matrices from the (N, d/2, 2) [cos, sin] table,
    built once per model forward (not timed)."""
    cos, sin = freqs.unbind(-1)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def stock_apply_rope(x, rot):
    """Flux's ``apply_rope``: x (B, H, N, d), interleaved channel pairs, float32 math."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (rot[..., 0] * x_[..., 0] + rot[..., 1] * x_[..., 1]).reshape(x.shape).type_as(x)


def stock_norm_rope(q, k, q_weight, k_weight, rot):
    """(B, N, H, d) q, k -> (B, H, N, d): RMSNorm per head (what ``nn.RMSNorm`` runs), RoPE if a table."""
    q, k = (F.rms_norm(t.transpose(1, 2), (t.shape[-1],), w, eps=EPS) for t, w in ((q, q_weight), (k, k_weight)))
    if rot is not None:
        q, k = stock_apply_rope(q, rot), stock_apply_rope(k, rot)
    return q, k


def stock_qk_joint(q_img, k_img, v_img, q_txt, k_txt, v_txt, q_w, k_w, txt_q_w, txt_k_w, attn_mask, rot):
    qi, ki = stock_norm_rope(q_img, k_img, q_w, k_w, rot)
    qt, kt = stock_norm_rope(q_txt, k_txt, txt_q_w, txt_k_w, None)
    q, k = torch.cat([qt, qi], dim=2), torch.cat([kt, ki], dim=2)
    v = torch.cat([v_txt, v_img], dim=1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)
    N_txt = q_txt.shape[1]
    return out[:, N_txt:], out[:, :N_txt]


def stock_qk_self(q_img, k_img, v_img, q_w, k_w, attn_mask, rot):
    q, k = stock_norm_rope(q_img, k_img, q_w, k_w, rot)
    return (F.scaled_dot_product_attention(q, k, v_img.transpose(1, 2)).transpose(1, 2),)


STOCK_QK = {"joint": stock_qk_joint, "self": stock_qk_self}
COMPILED_STOCK_QK = {kind: torch.compile(fn, dynamic=False) for kind, fn in STOCK_QK.items()}


def fastdit_qk_forward(impl, joint):
    """fastdit's QK-norm + RoPE + attention with the stock functions' signature."""
    fused = getattr(fastdit.ops, "joint_attention_qk", None)
    backend = "reference" if impl == "fastdit-reference" else "triton"

    def run(qi, ki, vi, qt, kt, vt, q_w, k_w, txt_q_w, txt_k_w, txt_mask, freqs):
        if impl != FASTDIT_2OPS:
            return fused(qi, ki, vi, qt, kt, vt, txt_mask, q_weight=q_w, k_weight=k_w, txt_q_weight=txt_q_w,
                         txt_k_weight=txt_k_w, img_freqs=freqs, eps=EPS, backend=backend)
        qi, ki = qk_norm_rope(qi, ki, q_w, k_w, freqs, EPS, backend=backend)
        if qt is not None:
            qt, kt = qk_norm_rope(qt, kt, txt_q_w, txt_k_w, None, EPS, backend=backend)
        return joint_attention(qi, ki, vi, qt, kt, vt, txt_mask, backend=backend)

    if joint:
        def forward(qi, ki, vi, qt, kt, vt, q_w, k_w, txt_q_w, txt_k_w, txt_mask, freqs):
            return run(qi, ki, vi, qt, kt, vt, q_w, k_w, txt_q_w, txt_k_w, txt_mask, freqs)
    else:
        def forward(qi, ki, vi, q_w, k_w, txt_mask, freqs):
            return run(qi, ki, vi, None, None, None, q_w, k_w, None, None, None, freqs)[:1]
    return forward, (None if fused is not None or impl == FASTDIT_2OPS
                     else "fastdit.ops.joint_attention_qk does not exist yet")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", QK_IMPLS)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_attention_qk(gpu_bench, randn, direction, impl, shape):
    B, H, N_img, N_txt, d = SHAPES[shape]
    joint = N_txt > 0
    kind = "joint" if joint else "self"
    side = int(round(N_img ** 0.5))
    assert side * side == N_img, "image tokens form a square grid"
    freqs = rope_freqs_2d(side, side, d, device="cuda")
    lengths = caption_lengths(B, N_txt) if joint else None
    inputs = qkv_views(randn, B, N_img, H, d) + (qkv_views(randn, B, N_txt, H, d) if joint else [])
    inputs += [(1 + 0.1 * randn(d)).requires_grad_() for _ in range(4 if joint else 2)]  # QK-norm weights
    stock_args = (sdpa_key_mask(lengths, N_txt, N_img) if joint else None, stock_rope_table(freqs))
    kwargs = dict(group=f"attention_qk.{direction}", impl=impl, shape=shape_label(shape),
                  flops=FLOP_FACTOR[direction] * attention_flops(shape))
    if joint:
        kwargs["caption_lengths"] = lengths.tolist()

    if impl in ("eager-stock", "compile-stock"):
        forward = (STOCK_QK if impl == "eager-stock" else COMPILED_STOCK_QK)[kind]
        extra_args = stock_args
    else:
        skip_reference_math_oom(impl, shape)
        forward, reason = fastdit_qk_forward(impl, joint)
        if reason:
            pytest.skip(reason)
        extra_args = (fastdit_txt_mask(lengths, N_txt) if joint else None, freqs)
    build = direction_builder(direction, forward, inputs, extra_args)
    reason = refusal(build)
    if reason:
        pytest.skip(f"{impl} refuses {shape_label(shape)}: {reason}")
    if impl not in ("eager-stock", "compile-stock"):
        with torch.no_grad():
            kwargs["rel_err"] = check_against(impl, forward(*inputs, *extra_args),
                                              STOCK_QK[kind](*inputs, *stock_args), lengths, tolerance=3e-2)
    gpu_bench(build, **kwargs)


# ------------------------------------------------------------------------ 3. the attention module

class StockMMDiTAttention(nn.Module):
    """MMDiT attention as stock PyTorch code writes it (SD3/Flux double block; with ``joint=False``, DiT's
    timm attention with QK-norm): per-stream fused QKV Linear, ``F.rms_norm`` of q and k per head, Flux's
    RoPE on the image tokens, ``torch.cat`` [text, image], SDPA, split, per-stream output Linear."""

    def __init__(self, dim, num_heads, joint):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.img_qkv, self.img_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.img_q_scale, self.img_k_scale = (nn.Parameter(torch.ones(self.head_dim)) for _ in range(2))
        if joint:
            self.txt_qkv, self.txt_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.txt_q_scale, self.txt_k_scale = (nn.Parameter(torch.ones(self.head_dim)) for _ in range(2))

    def _qkv(self, x, qkv, q_scale, k_scale, rot):
        B, N, _ = x.shape
        q, k, v = qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        q, k = (F.rms_norm(t, (self.head_dim,), w, eps=EPS) for t, w in ((q, q_scale), (k, k_scale)))
        if rot is not None:
            q, k = stock_apply_rope(q, rot), stock_apply_rope(k, rot)
        return q, k, v

    def forward(self, x, context=None, attn_mask=None, rot=None):
        B, N_img, dim = x.shape
        q, k, v = self._qkv(x, self.img_qkv, self.img_q_scale, self.img_k_scale, rot)
        if context is None:
            out = F.scaled_dot_product_attention(q, k, v)
            return (self.img_out(out.transpose(1, 2).reshape(B, N_img, dim)),)
        qt, kt, vt = self._qkv(context, self.txt_qkv, self.txt_q_scale, self.txt_k_scale, None)
        q, k, v = (torch.cat([t, i], dim=2) for t, i in ((qt, q), (kt, k), (vt, v)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, -1, dim)
        N_txt = context.shape[1]
        return self.img_out(out[:, N_txt:]), self.txt_out(out[:, :N_txt])


STOCK_KEYS = {"qkv.": "img_qkv.", "proj.": "img_out.", "txt_proj.": "txt_out.", "q_norm.weight": "img_q_scale",
              "k_norm.weight": "img_k_scale", "txt_q_norm.weight": "txt_q_scale", "txt_k_norm.weight": "txt_k_scale"}


def stock_state_dict(fastdit_state):
    """fastdit ``JointAttention`` keys -> ``StockMMDiTAttention`` keys."""
    mapped = {}
    for key, value in fastdit_state.items():
        prefix = next((p for p in STOCK_KEYS if key.startswith(p)), None)
        mapped[key if prefix is None else STOCK_KEYS[prefix] + key[len(prefix):]] = value
    return mapped


def module_flops(shape, direction):
    B, H, N_img, N_txt, d = SHAPES[shape]
    linear = 8.0 * B * (N_img + N_txt) * (H * d) ** 2  # QKV (3D) + output (D) projections of both streams
    return {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction] * linear + FLOP_FACTOR[direction] * attention_flops(shape)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", MODULE_IMPLS)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_attention_module(gpu_bench, randn, direction, impl, shape):
    forced_path = impl[len("fastdit-path-"):] if impl.startswith("fastdit-path-") else None
    set_attention_path(forced_path)
    try:
        attention_module_case(gpu_bench, randn, direction, impl, shape, forced_path)
    finally:
        set_attention_path(None)


def attention_module_case(gpu_bench, randn, direction, impl, shape, forced_path):
    B, H, N_img, N_txt, d = SHAPES[shape]
    joint, dim = N_txt > 0, H * d
    side = int(round(N_img ** 0.5))
    assert side * side == N_img, "image tokens form a square grid"
    if impl.startswith("fastdit"):
        skip_reference_math_oom(impl, shape)
    backend = "reference" if impl == "fastdit-reference" else ("auto" if forced_path else "triton")
    fastdit_module = JointAttention(dim, H, joint=joint, qk_norm=True, backend=backend)
    with torch.no_grad():  # QK-norm scales away from 1, so that a wrong key mapping shows in the check
        generator = torch.Generator().manual_seed(0)
        for name, p in fastdit_module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    stock = StockMMDiTAttention(dim, H, joint)
    stock.load_state_dict(stock_state_dict(fastdit_module.state_dict()))
    fastdit_module.to("cuda", torch.bfloat16)
    stock.to("cuda", torch.bfloat16)

    x = randn(B, N_img, dim, requires_grad=True)
    context = randn(B, N_txt, dim, requires_grad=True) if joint else None
    freqs = rope_freqs_2d(side, side, d, device="cuda")
    lengths = caption_lengths(B, N_txt) if joint else None
    stock_args = (sdpa_key_mask(lengths, N_txt, N_img) if joint else None, stock_rope_table(freqs))

    def stock_forward(x, context, *params):
        return stock(x, context, *stock_args)

    if impl in ("eager-stock", "compile-stock"):
        module = stock if impl == "eager-stock" else torch.compile(stock, dynamic=False)
        params = list(stock.parameters())

        def forward(x, context, *params):
            return module(x, context, *stock_args)
    else:
        txt_mask = fastdit_txt_mask(lengths, N_txt) if joint else None
        params = list(fastdit_module.parameters())

        def forward(x, context, *params):
            out = fastdit_module(x, context, txt_mask, img_freqs=freqs)
            return out if joint else out[:1]
    inputs = [x, context, *params] if joint else [x, *params]
    call = forward if joint else (lambda x, *params: forward(x, None, *params))
    build = direction_builder(direction, call, inputs)
    reason = refusal(build)
    if reason:
        pytest.skip(f"{impl} refuses {shape_label(shape)}: {reason}")
    kwargs = dict(group=f"attention_module.{direction}", impl=impl, shape=shape_label(shape),
                  flops=module_flops(shape, direction), attention_flops=FLOP_FACTOR[direction] * attention_flops(shape))
    if joint:
        kwargs["caption_lengths"] = lengths.tolist()
    if impl.startswith("fastdit"):
        with torch.no_grad():
            kwargs["rel_err"] = check_against(impl, forward(x, context), stock_forward(x, context), lengths,
                                              tolerance=3e-2)
    gpu_bench(build, **kwargs)
