"""Triton joint flash attention (kernels/attention.py) through joint_attention / joint_attention_qk: outputs
and every gradient (dq, dk, dv of both streams, the QK-norm weights, through RoPE) against float64 under the
2x rule; image lengths 1, 7, 113, 257; caption lengths 0, 1, 77 with per-sample padding and a sample with no
real caption token; head dims 64, 72, 80, 96, 128; both layouts; deterministic backward.

On CPU the kernel runs in Triton's interpreter with float16/float32 (its tl.dot on bfloat16 is wrong);
on a GPU bfloat16 too."""
import pytest
import torch

from fastdit.ops import joint_attention, joint_attention_qk, rope_freqs_1d, rope_freqs_2d
from fastdit.testing import assert_close_to_reference, group_scale

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
DTYPE_IDS = ["fp16", "fp32"] + (["bf16"] if ON_GPU else [])


def slow_on_cpu(n_img=1, n_txt=0, d=64, **_):
    """The interpreter runs one program at a time: cost grows with (tokens/16)² blocks."""
    return (n_img + n_txt) > 140 or d not in (64, 72)


def _inputs(B, n_img, n_txt, H, d, dtype, device, txt_lengths=None, layout="bnhd"):
    def make(n):
        # q, k, v of a stream as strided views of one (B, N, 3, H, d) projection output, as in a model
        qkv = torch.randn(B, n, 3, H, d, device=device).to(dtype)
        views = qkv.unbind(2)
        if layout == "bhnd":
            views = [t.transpose(1, 2) for t in views]
        return [t.requires_grad_() for t in views]

    img = make(n_img)
    txt = make(n_txt) if n_txt else [None] * 3
    return img, txt


def _lengths(B, n_txt, device):
    """Per-sample real caption tokens: full, none, and partial (one of each, cycling)."""
    options = [n_txt, 0, max(1, n_txt // 3)]
    return torch.tensor([options[b % 3] for b in range(B)], device=device)


def _run(fn, inputs, cotangents):
    outs = [o for o in fn(*inputs) if o is not None]
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(outs, wanted, cotangents[:len(outs)])
    return outs, grads


def _check(name_fn, inputs, kwargs_for, masked_txt_rows=None):
    """Fast path vs the reference in the same dtype vs float64; every output and gradient."""
    inputs64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ours_outs = [o for o in name_fn(*inputs, **kwargs_for("triton", False)) if o is not None]
    cot = [torch.randn_like(o) for o in ours_outs]
    if masked_txt_rows is not None and len(cot) == 2:
        cot[1] = cot[1] * masked_txt_rows  # padded caption queries produce meaningless rows: no gradient in
    ours = _run(lambda *a: name_fn(*a, **kwargs_for("triton", False)), inputs, cot)
    ref = _run(lambda *a: name_fn(*a, **kwargs_for("reference", False)), inputs, cot)
    ref64 = _run(lambda *a: name_fn(*a, **kwargs_for("reference", True)), inputs64, [c.double() for c in cot])
    for i, (o, r, r64) in enumerate(zip(ours[0], ref[0], ref64[0])):
        if masked_txt_rows is not None and i == 1:
            o, r, r64 = o * masked_txt_rows, r * masked_txt_rows, r64 * masked_txt_rows.double()
        assert torch.isfinite(o).all(), f"out{i} has non-finite values"
        assert_close_to_reference(o, r, r64, name=f"out{i}")
    # A gradient can be exactly 0 by cancellation (dq and dk over one key): its floor is scaled by the size of
    # the gradients of the same call, not by its own zero (see fastdit.testing).
    grad_scale = group_scale(ref64[1])
    for i, (g, gr, g64) in enumerate(zip(ours[1], ref[1], ref64[1])):
        assert torch.isfinite(g).all(), f"grad {i} has non-finite values"
        assert g.dtype == gr.dtype
        assert_close_to_reference(g, gr, g64, name=f"grad{i}", scale=grad_scale)


def _rows_mask(lengths, n_txt, layout, dtype):
    rows = (torch.arange(n_txt, device=lengths.device)[None, :] < lengths[:, None]).to(dtype)
    return rows[:, :, None, None] if layout == "bnhd" else rows[:, None, :, None]


CASES = [  # (n_img, n_txt, d)
    (1, 0, 64), (7, 0, 72), (113, 0, 64), (257, 0, 128),
    (7, 1, 64), (19, 5, 72), (33, 17, 80), (113, 77, 64), (257, 77, 96), (40, 9, 128),
    # key counts that fill whole key blocks (16 in the interpreter, 128 forward on a GPU), unmasked:
    # the forward's all-valid path
    (48, 16, 72), (256, 0, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n_img,n_txt,d", CASES, ids=[f"img{a}-txt{b}-d{c}" for a, b, c in CASES])
def test_plain_attention_matches_float64(n_img, n_txt, d, dtype, device):
    B, H = 3, 2
    (qi, ki, vi), (qt, kt, vt) = _inputs(B, n_img, n_txt, H, d, dtype, device)
    lengths = _lengths(B, n_txt, device) if n_txt else None
    rows = _rows_mask(lengths, n_txt, "bnhd", dtype) if n_txt else None

    def kwargs_for(backend, _):
        return dict(backend=backend)

    def fn(*a, backend):
        return joint_attention(*a, txt_mask=lengths, backend=backend)

    _check(fn, [qi, ki, vi, qt, kt, vt], kwargs_for, rows)


QK_CASES = [  # (n_img as (h, w) grid, n_txt, d, interleaved, norm, rope_txt)
    ((2, 4), 5, 64, True, True, True), ((3, 5), 3, 72, False, True, False), ((1, 7), 0, 64, True, False, None),
    ((4, 4), 77, 96, True, True, True), ((8, 16), 9, 128, False, True, True),
]


# the fused path on every case; the prepass path (QK-norm/RoPE kernel once per token, then the plain attention
# kernel; see fastdit.ops.attention_path) on the first three
QK_PATH_CASES = [(*case, "fused") for case in QK_CASES] + [(*case, "prepass") for case in QK_CASES[:3]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("grid,n_txt,d,interleaved,norm,rope_txt,path", QK_PATH_CASES,
                         ids=[f"{p}-{g[0]}x{g[1]}-txt{t}-d{d}-{'inter' if i else 'half'}-{'norm' if n else 'nonorm'}"
                              for g, t, d, i, n, _, p in QK_PATH_CASES])
def test_qk_norm_rope_attention_matches_float64(grid, n_txt, d, interleaved, norm, rope_txt, path, dtype, device):
    from fastdit.ops.attention import _check_and_canonicalize, _run_path

    B, H = 2, 2
    n_img = grid[0] * grid[1]
    (qi, ki, vi), (qt, kt, vt) = _inputs(B, n_img, n_txt, H, d, dtype, device)
    weights = [((torch.rand(d, device=device) + 0.5)).requires_grad_() if norm else None for _ in range(4)]
    if not n_txt:
        weights[2] = weights[3] = None
    img_freqs = rope_freqs_2d(*grid, d, device=device)
    txt_freqs = rope_freqs_1d(n_txt, d, device=device) if (n_txt and rope_txt) else None
    lengths = _lengths(B, n_txt, device) if n_txt else None
    rows = _rows_mask(lengths, n_txt, "bnhd", dtype) if n_txt else None

    def fn(qi, ki, vi, qt, kt, vt, w0, w1, w2, w3, *, backend):
        if path == "prepass" and backend == "triton":
            tensors, mask, scale = _check_and_canonicalize(qi, ki, vi, qt, kt, vt, lengths, None, "bnhd")
            return _run_path("prepass", *tensors, mask, img_freqs, txt_freqs, w0, w1, w2, w3, scale, 1e-6,
                             interleaved, "bnhd", backend="triton")
        return joint_attention_qk(qi, ki, vi, qt, kt, vt, lengths, q_weight=w0, k_weight=w1, txt_q_weight=w2,
                                  txt_k_weight=w3, img_freqs=img_freqs, txt_freqs=txt_freqs,
                                  interleaved=interleaved, backend=backend)

    _check(fn, [qi, ki, vi, qt, kt, vt, *weights], lambda backend, _: dict(backend=backend), rows)


NORM_ONLY_CASES = [(19, 5, 72), (33, 0, 80), (21, 9, 96)]  # (n_img, n_txt, d)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n_img,n_txt,d", NORM_ONLY_CASES, ids=[f"img{a}-txt{b}-d{c}" for a, b, c in NORM_ONLY_CASES])
def test_qk_norm_without_rope_matches_float64(n_img, n_txt, d, dtype, device):
    """QK-norm without RoPE: a head dim that is not a power of two is held as its widest power of two and the
    rest (72 = 64 + 8), so the norm, the weights and their gradients cross that split."""
    B, H = 2, 2
    (qi, ki, vi), (qt, kt, vt) = _inputs(B, n_img, n_txt, H, d, dtype, device)
    weights = [((torch.rand(d, device=device) + 0.5)).requires_grad_() for _ in range(4)]
    if not n_txt:
        weights[2] = weights[3] = None
    lengths = _lengths(B, n_txt, device) if n_txt else None
    rows = _rows_mask(lengths, n_txt, "bnhd", dtype) if n_txt else None

    def fn(qi, ki, vi, qt, kt, vt, w0, w1, w2, w3, *, backend):
        return joint_attention_qk(qi, ki, vi, qt, kt, vt, lengths, q_weight=w0, k_weight=w1, txt_q_weight=w2,
                                  txt_k_weight=w3, backend=backend)

    _check(fn, [qi, ki, vi, qt, kt, vt, *weights], lambda backend, _: dict(backend=backend), rows)


@pytest.mark.parametrize("rope,interleaved", [(False, False), (True, False), (True, True)],
                         ids=["norope", "rope-half", "rope-interleaved"])
def test_channel_layout_holds_each_channel_once(rope, interleaved):
    """The (a, b) tiles of q and k: every channel exactly once, power-of-two widths of at least 16 (tl.dot);
    without RoPE the second tile starts 16-byte aligned and the padding is at most that of one 16-wide tile.
    The same for the tiles of v, o and do."""
    from fastdit.kernels.attention import _channel_layout, _value_layout
    from fastdit.ops.attention import TRITON_HEAD_DIMS

    for d in TRITON_HEAD_DIMS:
        lay = _channel_layout(d, rope, interleaved)
        assert lay["D"] == d and lay["INTERLEAVED"] == (rope and interleaved)
        if lay["INTERLEAVED"]:
            a, b = [2 * i for i in range(lay["WA"])], [2 * i + 1 for i in range(lay["WB"])]
        else:
            a, b = list(range(lay["WA"])), [lay["OFF_B"] + j for j in range(lay["WB"])]
        assert sorted(a + b) == list(range(d)), d
        for block, width in ((lay["BLOCK_A"], lay["WA"]), (lay["BLOCK_B"], lay["WB"])):
            assert block >= max(width, 16) and block & (block - 1) == 0, (d, block, width)
        if rope:
            assert lay["WA"] == lay["WB"] == d // 2
        else:
            assert (lay["OFF_B"] * 2) % 16 == 0, d
            assert lay["BLOCK_A"] + lay["BLOCK_B"] < d + 16, d
        values = _value_layout(d)  # v, o, do: [0, VA) in a BLOCK_D tile, [VA, d) in a BLOCK_VB tile
        assert values["BLOCK_D"] >= values["VA"] and values["VA"] <= d
        if values["VA"] < d:
            assert values["BLOCK_VB"] >= d - values["VA"] and values["BLOCK_D"] + values["BLOCK_VB"] < d + 16
            assert (values["VA"] * 2) % 16 == 0
        else:
            assert values["BLOCK_D"] == d


def slow_on_cpu_layout(**_):
    return False


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_layouts_and_bool_masks(layout, device):
    """(B, H, N, d) inputs, and a non-prefix bool caption mask, give what the reference gives."""
    B, H, d = 2, 2, 64
    (qi, ki, vi), (qt, kt, vt) = _inputs(B, 11, 6, H, d, torch.float32, device, layout=layout)
    mask = torch.tensor([[True, False, True, True, False, True], [False] * 6], device=device)
    ours = joint_attention(qi, ki, vi, qt, kt, vt, mask, layout=layout, backend="triton")
    ref = joint_attention(qi, ki, vi, qt, kt, vt, mask, layout=layout, backend="reference")
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)


def test_backward_is_bitwise_deterministic(device):
    B, H, d = 2, 2, 64
    (qi, ki, vi), (qt, kt, vt) = _inputs(B, 37, 9, H, d, torch.float16, device)
    w = [torch.rand(d, device=device).requires_grad_() for _ in range(4)]
    lengths = torch.tensor([9, 4], device=device)
    freqs = rope_freqs_1d(37, d, device=device)
    inputs = [qi, ki, vi, qt, kt, vt] + w
    out = joint_attention_qk(qi, ki, vi, qt, kt, vt, lengths, q_weight=w[0], k_weight=w[1], txt_q_weight=w[2],
                             txt_k_weight=w[3], img_freqs=freqs, backend="triton")
    cot = [torch.randn_like(o) for o in out]
    first = torch.autograd.grad(out, inputs, cot, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, inputs, cot, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_dkdv_kernel_takes_its_own_tiles(device):
    """``dkdv_config`` launches the dk/dv kernel with its own tiles (keys held × queries streamed) while the dq
    kernel keeps its own: dq is bit for bit the default's, dk/dv agree to rounding, with a caption mask,
    QK-norm and RoPE."""
    from fastdit.kernels.attention import Stream, _config, attention_bwd, attention_fwd

    B, H, d = 2, 2, 64
    (qi, ki, vi), (qt, kt, vt) = _inputs(B, 37, 9, H, d, torch.float32, device)
    weights = [torch.rand(d, device=device) + 0.5 for _ in range(4)]
    mask = (torch.arange(9, device=device)[None, :] < torch.tensor([[9], [4]], device=device)).to(torch.int8)
    txt = Stream(qt, kt, vt, weights[2], weights[3], None, mask)
    img = Stream(qi, ki, vi, weights[0], weights[1], rope_freqs_1d(37, d, device=device))
    o_img, o_txt, lse = attention_fwd(txt, img, d ** -0.5, 1e-6, True)
    do_img, do_txt = torch.randn_like(o_img), torch.randn_like(o_txt)
    args = (do_img, do_txt, txt, img, o_img, o_txt, lse, d ** -0.5, 1e-6, True)
    default = attention_bwd(*args)
    dq_tiles = _config(d, torch.float32, torch.device(device), None, None, None, None, "dq")
    own = attention_bwd(*args, dkdv_config=(dq_tiles[0] * 2, dq_tiles[1] * 2, 4, 1))
    assert default.keys() == own.keys()
    for key in default:
        if key.startswith("dq"):
            assert torch.equal(default[key], own[key]), key
        else:
            torch.testing.assert_close(own[key], default[key], rtol=1e-5, atol=1e-5, msg=key)


def test_unsupported_inputs_name_the_problem(device):
    q = torch.randn(1, 4, 2, 32, device=device)
    with pytest.raises(ValueError, match="head dim 32"):
        joint_attention(q, q, q, backend="triton")
    q = torch.randn(1, 4, 2, 64, device=device)
    with pytest.raises(ValueError, match="q_weight must be"):
        joint_attention_qk(q, q, q, q_weight=torch.ones(32, device=device), k_weight=torch.ones(32, device=device),
                           backend="triton")
    with pytest.raises(ValueError, match="img_freqs must be"):
        joint_attention_qk(q, q, q, img_freqs=rope_freqs_1d(5, 64, device=device), backend="triton")
    with pytest.raises(ValueError, match="give both q_weight and k_weight"):
        joint_attention_qk(q, q, q, q_weight=torch.ones(64, device=device), backend="triton")


def test_attention_path_follows_the_backend_and_the_override(device):
    from fastdit.ops import attention_path, set_attention_path

    q = torch.randn(2, 8, 2, 64, device=device)
    assert attention_path(q, backend="reference") == "sdpa"
    assert attention_path(q, backend="triton") == "kernel"
    if device.type == "cpu":  # auto on CPU: no kernel launch outside the test interpreter
        assert attention_path(q, backend="auto") == "sdpa"
    assert attention_path(torch.randn(2, 8, 2, 32, device=device), backend="auto") == "sdpa"  # unsupported dim
    try:
        set_attention_path("kernel")
        if device.type == "cuda":
            assert attention_path(q, backend="auto") == "kernel"
        set_attention_path("prepass")
        if device.type == "cuda":
            assert attention_path(q, backend="auto", fused_qk=True) == "prepass"
        with pytest.raises(ValueError, match="attention path"):
            set_attention_path("fast")
        import fastdit.ops.attention as attention_ops
        attention_ops._path_override = "kernal"  # as a mistyped FASTDIT_ATTENTION_PATH leaves it
        with pytest.raises(ValueError, match="FASTDIT_ATTENTION_PATH must be one of"):
            attention_path(q, backend="auto")
    finally:
        set_attention_path(None)


@pytest.mark.skipif(not ON_GPU, reason="the paths are measured on CUDA only")
def test_measuring_the_paths_leaves_the_global_rng_alone():
    """A resumed run measures at another step than the run it continues: the draws must not shift."""
    from fastdit.ops.attention import _measure_paths

    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16)
    cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()
    assert _measure_paths(q, None, False) in ("kernel", "sdpa")
    assert _measure_paths(q, q[:, :5], True) in ("kernel", "prepass", "sdpa")
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state) and torch.equal(torch.get_rng_state(), cpu_state)


def test_tile_fallback_takes_the_first_configuration_that_fits():
    from triton.runtime.errors import OutOfResources

    from fastdit.kernels.attention import _FALLBACKS, _with_fallback

    tried = []

    def launch(block_m, block_n, warps, stages, **kwargs):
        tried.append((block_m, block_n, warps, stages))
        if block_m * block_n > 64 * 32:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return "ran", kwargs

    assert _with_fallback(launch, (128, 128, 8, 3), False, {"x": 1}) == ("ran", {"x": 1})
    assert tried == [(128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1)]
    tried.clear()
    with pytest.raises(OutOfResources):  # tiles asked for explicitly are never replaced
        _with_fallback(launch, (128, 128, 8, 3), True, {})
    assert tried == [(128, 128, 8, 3)]
    with pytest.raises(OutOfResources):  # nothing fits: the last error is raised
        _with_fallback(lambda *a: launch(256, 256, 8, 3), (128, 128, 8, 3), False, {})
    assert (32, 32, 4, 1) == _FALLBACKS[-1]


def test_backward_falls_back_to_smaller_tiles_when_out_of_resources(monkeypatch, device):
    """Both backward kernels retry with smaller tiles (and re-sized partial sums) when a launch runs out
    of shared memory: simulated here by refusing 64 × 64 tiles."""
    from triton.runtime.errors import OutOfResources

    import fastdit.kernels.attention as kernels

    class Refusing:
        def __init__(self, kernel):
            self.kernel, self.refused = kernel, 0

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["BLOCK_M"] * kwargs["BLOCK_N"] >= 64 * 64:
                    self.refused += 1
                    raise OutOfResources(300_000, 232_448, "shared memory")
                return self.kernel[grid](*args, **kwargs)
            return launch

    real_config = kernels._config
    monkeypatch.setattr(kernels, "_config", lambda d, dtype, dev, bm, bn, warps, stages, kernel: real_config(
        d, dtype, dev, bm or (64 if kernel != "fwd" else None), bn or (64 if kernel != "fwd" else None), warps,
        stages, kernel))
    dq_kernel, dkdv_kernel = Refusing(kernels._attn_bwd_dq_kernel), Refusing(kernels._attn_bwd_dkdv_kernel)
    monkeypatch.setattr(kernels, "_attn_bwd_dq_kernel", dq_kernel)
    monkeypatch.setattr(kernels, "_attn_bwd_dkdv_kernel", dkdv_kernel)
    B, H, d = 2, 2, 64
    (qi, ki, vi), (qt, kt, vt) = _inputs(B, 40, 9, H, d, torch.float32, device)
    weights = [(torch.rand(d, device=device) + 0.5).requires_grad_() for _ in range(4)]
    lengths = torch.tensor([9, 4], device=device)

    def fn(*tensors, backend):
        return joint_attention_qk(*tensors[:6], lengths, q_weight=tensors[6], k_weight=tensors[7],
                                  txt_q_weight=tensors[8], txt_k_weight=tensors[9], backend=backend)

    inputs = [qi, ki, vi, qt, kt, vt, *weights]
    cot = [torch.randn_like(o) for o in fn(*inputs, backend="reference")]
    cot[1] = cot[1] * _rows_mask(lengths, 9, "bnhd", torch.float32)
    ours = _run(lambda *a: fn(*a, backend="triton"), inputs, cot)
    ref = _run(lambda *a: fn(*a, backend="reference"), inputs, cot)
    assert dq_kernel.refused == 2 and dkdv_kernel.refused == 2  # one refusal per stream, then a fallback
    for g, r in zip(ours[1], ref[1]):
        torch.testing.assert_close(g, r, rtol=2e-3, atol=2e-3)


def test_head_align_is_the_largest_power_of_two_of_the_strides():
    from fastdit.kernels.attention import _head_align

    qkv = torch.empty(2, 5, 3, 16, 72)  # a packed projection: head stride 72, sample stride 5·3·16·72
    assert _head_align(qkv.unbind(2)) == 8
    assert _head_align(qkv.unbind(2), 36) == 4
    assert _head_align([torch.empty(2, 5, 4, 64)]) == 16
    assert _head_align([torch.empty(2, 5, 3, 16, 73)[:, :, 0]]) == 1
