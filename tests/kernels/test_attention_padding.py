"""Padded caption positions cannot influence anything (issue 14, item 10).

Padded caption tokens (``txt_mask`` False) hold whatever the buffers hold: uninitialised memory, the
overflowing projection of a padding token — NaN or inf. A padded key gets zero attention weight, but
0 · NaN = NaN, so every backend has to *select* them away rather than multiply by the mask. Here the padded
caption positions of q, k AND v hold NaN (or +inf) and, on every backend and path (SDPA reference, the
Triton kernel, the QK-norm/RoPE kernel followed by the attention kernel, QK-norm/RoPE fused into the
attention kernel's loads, and the reference math the kernel op falls back to):

- every output and every gradient is finite;
- padded caption rows' outputs are exactly zero, and the gradients at padded positions are exactly zero
  (also when the incoming gradient of the padded output rows is not);
- everything equals, bit for bit, the same call with zeros at the padded positions, which in turn matches
  the float64 reference under the 2x rule (fastdit.testing).

On CPU the kernels run in Triton's interpreter with float16/float32 (its tl.dot on bfloat16 is wrong); on a
GPU bfloat16 too.
"""
import pytest
import torch

from fastdit.ops import joint_attention, joint_attention_qk, rope_freqs_1d, rope_freqs_2d
from fastdit.testing import assert_close_to_reference, group_scale

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
DTYPE_IDS = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}
POISONS = {"nan": float("nan"), "inf": float("inf")}
B = 3


def _params(cases, light_dtypes, case_id):
    """(case, dtype) pairs: every dtype for every case on a GPU; on CPU, where the interpreter is slow, the
    cases whose ``light_dtypes`` entry is given run in that dtype only."""
    out = []
    for case, light in zip(cases, light_dtypes):
        for dtype in DTYPES:
            if ON_GPU or light is None or dtype == light:
                out.append(pytest.param(*case, dtype, id=f"{case_id(*case)}-{DTYPE_IDS[dtype]}"))
    return out


def _valid(kind, n_txt, device):
    """(txt_mask as the op takes it, bool (B, n_txt) of real tokens): lengths [full, 0, partial], or a
    bool mask with holes."""
    if kind == "lengths":
        lengths = torch.tensor([n_txt, 0, max(1, n_txt // 3)], device=device)
        return lengths, torch.arange(n_txt, device=device)[None, :] < lengths[:, None]
    mask = torch.rand(B, n_txt, device=device) < 0.5
    mask[0] = True
    mask[1] = False
    mask[2, 0], mask[2, 1] = False, True
    return mask, mask


def _streams(n_img, n_txt, H, d, dtype, device, valid):
    """{"clean": inputs, "nan": inputs, "inf": inputs}, inputs = [q_img, k_img, v_img, q_txt, k_txt, v_txt]:
    strided views of one (B, N, 3, H, d) projection per stream, as in a model. "clean" has zeros at the
    padded caption positions (of q, k and v), the others NaN or +inf there; everything else is the same."""
    img = torch.randn(B, n_img, 3, H, d, device=device).to(dtype)
    txt = torch.randn(B, n_txt, 3, H, d, device=device).to(dtype)
    pad = ~valid[:, :, None, None, None]
    out = {}
    for name, fill in (("clean", 0.0), *POISONS.items()):
        t = txt.masked_fill(pad, fill)
        out[name] = [v.requires_grad_() for v in img.clone().unbind(2)] + [v.requires_grad_() for v in t.unbind(2)]
    return out


def _run(fn, inputs, cot):
    outs = fn(*inputs)
    grads = torch.autograd.grad(outs, inputs, cot)
    return list(outs), list(grads)


def _check(fn, ref_fn, streams, valid, weights=(), deterministic=True, rtol=None):
    """``fn`` on the poisoned inputs: every output and gradient finite, zero at padded positions, and bit for
    bit ``fn`` on the clean inputs (close to it where ``deterministic`` is False); ``fn`` on the clean inputs
    matches ``ref_fn`` (same dtype) against ``ref_fn`` in float64 under the 2x rule (for float64 inputs: within
    ``rtol`` of ``ref_fn``). Inputs: the six streams and the norm weights."""
    weights = list(weights)
    pad_rows = ~valid[:, :, None, None]
    qi, qt = streams["clean"][0], streams["clean"][3]
    # the incoming gradient is nonzero on the padded caption rows too: it must be ignored there
    cot = [torch.randn(qi.shape, device=qi.device).to(qi.dtype), torch.randn(qt.shape, device=qi.device).to(qi.dtype)]
    names = ["out_img", "out_txt", "dq_img", "dk_img", "dv_img", "dq_txt", "dk_txt", "dv_txt"] + [
        f"dweight{i}" for i in range(len(weights))]
    results = {}
    for kind in (*POISONS, "clean"):
        outs, grads = _run(fn, streams[kind] + weights, cot)
        results[kind] = outs + grads
        for name, t in zip(names, results[kind]):
            bad = int((~torch.isfinite(t)).sum())
            assert bad == 0, f"{kind}: {name} has {bad} non-finite values"
        assert not outs[1].masked_select(pad_rows).any(), f"{kind}: padded caption rows' outputs are not zero"
        for name, g in zip(names[5:8], grads[3:6]):
            assert not g.masked_select(pad_rows).any(), f"{kind}: {name} is not zero at padded positions"
    for kind in POISONS:
        for name, p, c in zip(names, results[kind], results["clean"]):
            if deterministic:
                assert torch.equal(p, c), f"{kind}: {name} differs from the zero-padded call's"
            else:
                torch.testing.assert_close(p, c, msg=lambda m: f"{kind}: {name}: {m}")
    # the clean result is the right one
    ref = _run(ref_fn, streams["clean"] + weights, cot)
    ref = ref[0] + ref[1]
    if rtol is not None:
        for name, o, r in zip(names, results["clean"], ref):
            torch.testing.assert_close(o, r, rtol=rtol, atol=rtol, msg=lambda m: f"{name}: {m}")
        return
    clean64 = [t.detach().double().requires_grad_() for t in streams["clean"] + weights]
    ref64 = _run(ref_fn, clean64, [c.double() for c in cot])
    ref64 = ref64[0] + ref64[1]
    scale = group_scale(ref64[2:])
    for i, (name, o, r, r64) in enumerate(zip(names, results["clean"], ref, ref64)):
        assert_close_to_reference(o, r, r64, name=name, scale=None if i < 2 else scale)


# (n_img, n_txt, d, H, mask). 17 caption tokens fill one 16-key block of the interpreter and start another.
# FULL tokens in each stream fill whole blocks (16 in the interpreter; on a GPU 128 is a multiple of every
# tile): the image keys then take the kernels' all-valid path, also against padded caption query rows.
FULL = 128 if ON_GPU else 16
PLAIN_CASES = [(7, 5, 64, 1, "lengths"), (7, 5, 64, 2, "bool"), (33, 17, 72, 1, "lengths"),
               (FULL, FULL, 64, 1, "lengths")]
PLAIN_LIGHT = [None, torch.float16, torch.float16, None]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("n_img,n_txt,d,H,mask_kind,dtype", _params(
    PLAIN_CASES, PLAIN_LIGHT, lambda n, t, d, h, m: f"img{n}-txt{t}-d{d}-h{h}-{m}"))
def test_joint_attention_ignores_padded_positions(n_img, n_txt, d, H, mask_kind, dtype, backend, device):
    txt_mask, valid = _valid(mask_kind, n_txt, device)
    streams = _streams(n_img, n_txt, H, d, dtype, device, valid)

    def fn(*a):
        return joint_attention(*a, txt_mask=txt_mask, backend=backend)

    def ref_fn(*a):
        return joint_attention(*a, txt_mask=txt_mask, backend="reference")

    # SDPA's CUDA backward may accumulate in a varying order
    _check(fn, ref_fn, streams, valid, deterministic=backend == "triton" or not ON_GPU)


# (image grid, n_txt, d, interleaved RoPE pairs)
QK_CASES = [((1, 7), 5, 64, True), ((2, 9), 17, 72, False)]
QK_PATHS = ["reference", "fused", "prepass"]


@pytest.mark.parametrize("path", QK_PATHS)
@pytest.mark.parametrize("grid,n_txt,d,interleaved,dtype", _params(
    QK_CASES, [None, torch.float32], lambda g, t, d, i: f"{g[0]}x{g[1]}-txt{t}-d{d}-{'inter' if i else 'half'}"))
def test_joint_attention_qk_ignores_padded_positions(grid, n_txt, d, interleaved, dtype, path, device):
    """QK-norm and RoPE on both streams: the per-token norm of a NaN row is NaN, and so is its backward
    (through rstd) even where the attention's gradient is 0, unless the padded positions are selected away
    before the norm. Paths: SDPA after the QK-norm/RoPE op ("reference"), fused into the attention kernel's
    loads ("fused"), the QK-norm/RoPE kernel then the attention kernel ("prepass")."""
    from fastdit.ops.attention import _check_and_canonicalize, _run_path

    if path == "prepass" and not ON_GPU and (grid != QK_CASES[0][0] or dtype != torch.float16):
        pytest.skip("the interpreter is slow: on CPU the prepass path runs the small case in float16 only")
    n_img = grid[0] * grid[1]
    txt_mask, valid = _valid("lengths", n_txt, device)
    streams = _streams(n_img, n_txt, 1, d, dtype, device, valid)
    weights = [(torch.rand(d, device=device) + 0.5).requires_grad_() for _ in range(4)]
    img_freqs = rope_freqs_2d(*grid, d, device=device)
    txt_freqs = rope_freqs_1d(n_txt, d, device=device)

    def run(path, qi, ki, vi, qt, kt, vt, w0, w1, w2, w3):
        if path == "prepass":
            tensors, mask, scale = _check_and_canonicalize(qi, ki, vi, qt, kt, vt, txt_mask, None, "bnhd")
            return _run_path("prepass", *tensors, mask, img_freqs, txt_freqs, w0, w1, w2, w3, scale, 1e-6,
                             interleaved, "bnhd", backend="triton")
        return joint_attention_qk(qi, ki, vi, qt, kt, vt, txt_mask, q_weight=w0, k_weight=w1, txt_q_weight=w2,
                                  txt_k_weight=w3, img_freqs=img_freqs, txt_freqs=txt_freqs,
                                  interleaved=interleaved, backend="triton" if path == "fused" else "reference")

    _check(lambda *a: run(path, *a), lambda *a: run("reference", *a), streams, valid, weights,
           deterministic=path != "reference" or not ON_GPU)


def test_reference_math_fallback_ignores_padded_positions(device):
    """The kernel op's own reference math (what it runs where the kernel cannot: float64, bfloat16 in the
    interpreter), with QK-norm and RoPE, against the SDPA path."""
    from fastdit.ops.attention import _check_and_canonicalize, _run_path

    n_txt, d, grid = 5, 64, (1, 7)
    txt_mask, valid = _valid("lengths", n_txt, device)
    streams = _streams(grid[0] * grid[1], n_txt, 2, d, torch.float64, device, valid)
    weights = [(torch.rand(d, device=device, dtype=torch.float64) + 0.5).requires_grad_() for _ in range(4)]
    img_freqs = rope_freqs_2d(*grid, d, device=device)
    txt_freqs = rope_freqs_1d(n_txt, d, device=device)

    def run(path, qi, ki, vi, qt, kt, vt, w0, w1, w2, w3):
        tensors, mask, scale = _check_and_canonicalize(qi, ki, vi, qt, kt, vt, txt_mask, None, "bnhd")
        return _run_path(path, *tensors, mask, img_freqs, txt_freqs, w0, w1, w2, w3, scale, 1e-6, True, "bnhd",
                         backend="reference")

    # rtol: the op keeps the log-sum-exp in float32 for its backward, also for float64 inputs
    _check(lambda *a: run("kernel", *a), lambda *a: run("sdpa", *a), streams, valid, weights,
           deterministic=not ON_GPU, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_joint_attention_module_ignores_padded_context(backend, device):
    """JointAttention (QK-norm, RoPE): NaN in padded context rows reaches neither output nor any gradient,
    the projections' weight gradients included (0 · NaN there would be NaN)."""
    from fastdit.modules import JointAttention

    dim, heads, n_txt, grid = 64, 1, 5, (1, 7)
    attn = JointAttention(dim, heads, joint=True, qk_norm=True, backend=backend).to(device)
    txt_mask, valid = _valid("lengths", n_txt, device)
    x = torch.randn(B, grid[0] * grid[1], dim, device=device)
    context = torch.randn(B, n_txt, dim, device=device)
    freqs = rope_freqs_2d(*grid, dim // heads, device=device), rope_freqs_1d(n_txt, dim // heads, device=device)
    cot = torch.randn_like(x), torch.randn_like(context)
    results = {}
    for kind, fill in (*POISONS.items(), ("clean", 0.0)):
        xs, ctx = x.clone().requires_grad_(), context.masked_fill(~valid[:, :, None], fill).requires_grad_()
        outs = attn(xs, ctx, txt_mask, *freqs)
        params = list(attn.parameters())
        grads = torch.autograd.grad(outs, [xs, ctx] + params, cot)
        results[kind] = list(outs) + list(grads)
        for t in results[kind]:
            assert bool(torch.isfinite(t).all()), f"{kind}: non-finite values"
        assert not grads[1].masked_select(~valid[:, :, None]).any(), f"{kind}: context gradient at padding"
    for kind in POISONS:
        for p, c in zip(results[kind], results["clean"]):
            assert torch.equal(p, c) if (backend == "triton" or not ON_GPU) else torch.allclose(p, c)
