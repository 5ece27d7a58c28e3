"""SingleStreamDiTBlock (Flux's parallel attention + MLP block): the float64 block equals a plain written-out
Flux single-stream block; each backend's output and every gradient follow the 2x rule against float64; padded
caption tokens take no part (NaN included) and pass through unchanged; the fast path runs fastdit's fused
attention; the block compiles without graph breaks."""
import pytest
import torch
import torch.nn.functional as F

from fastdit.modules import SingleStreamDiTBlock, set_module_backend
from fastdit.ops import rope_freqs_1d, rope_freqs_2d
from fastdit.testing import assert_close_to_reference

KEYS = ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "q_norm.weight", "k_norm.weight",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]


def _rotate(x, freqs):
    """x (B, H, N, d) rotated by a (N, d/2, 2) table, channel pairs interleaved (Flux's pairing)."""
    cos, sin = freqs[..., 0].to(x.dtype), freqs[..., 1].to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def stock_single_block(p, x, ctx, c, lengths, img_freqs, txt_freqs, heads, eps=1e-6):
    """Flux's single-stream block written out from BFL's ``SingleStreamBlock`` on the concatenation
    [caption, image], with fastdit's padding semantics: padded caption rows are zeros before the norm and the
    projection, masked out as keys, and returned unchanged. ``p``: the block's state dict."""
    B, N, D = x.shape
    L, d = ctx.shape[1], D // heads
    keep = torch.ones(B, L, dtype=torch.bool) if lengths is None else torch.arange(L) < lengths[:, None]
    keys = torch.cat([keep, torch.ones(B, N, dtype=torch.bool)], 1)
    shift, scale, gate = F.linear(F.silu(c), p["adaLN_modulation.1.weight"], p["adaLN_modulation.1.bias"]).chunk(3, 1)
    ctx0 = torch.where(keep[..., None], ctx, torch.zeros_like(ctx))
    seq = torch.cat([ctx0, x], 1)
    h = F.layer_norm(seq, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    h = torch.where(keys[..., None], h, torch.zeros_like(h))
    qkv, mlp = F.linear(h, p["linear1.weight"], p["linear1.bias"]).split([3 * D, p["linear1.weight"].shape[0] - 3 * D],
                                                                        -1)
    q, k, v = qkv.reshape(B, L + N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, d)
    q, k = F.rms_norm(q, (d,), p["q_norm.weight"], eps), F.rms_norm(k, (d,), p["k_norm.weight"], eps)
    if img_freqs is not None:
        q = torch.cat([q[:, :, :L], _rotate(q[:, :, L:], img_freqs)], 2)
        k = torch.cat([k[:, :, :L], _rotate(k[:, :, L:], img_freqs)], 2)
    if txt_freqs is not None:
        q = torch.cat([_rotate(q[:, :, :L], txt_freqs), q[:, :, L:]], 2)
        k = torch.cat([_rotate(k[:, :, :L], txt_freqs), k[:, :, L:]], 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :]).transpose(1, 2).reshape(B, L + N, D)
    out = seq + gate[:, None] * F.linear(torch.cat([o, F.gelu(mlp, approximate="tanh")], -1), p["linear2.weight"],
                                         p["linear2.bias"])
    return out[:, L:], torch.where(keep[..., None], out[:, :L], ctx)


def random_block(dim, heads, std=0.1, **kwargs):
    block = SingleStreamDiTBlock(dim, heads, **kwargs)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, std)
        block.q_norm.weight.add_(1.0)
        block.k_norm.weight.add_(1.0)
    return block


def test_state_dict_keys_and_fresh_block_is_the_identity():
    block = SingleStreamDiTBlock(64, 2)
    assert list(block.state_dict()) == KEYS
    assert block.linear1.weight.shape == (3 * 64 + 256, 64) and block.linear2.weight.shape == (64, 64 + 256)
    x, ctx = torch.randn(2, 5, 64), torch.randn(2, 3, 64)
    out_x, out_c = block(x, ctx, torch.randn(2, 64), torch.tensor([1, 3]))
    torch.testing.assert_close(out_x, x, rtol=0, atol=0)  # AdaLN-Zero: gate 0
    torch.testing.assert_close(out_c, ctx, rtol=0, atol=0)
    assert "qk_norm=True" in repr(block)
    assert list(SingleStreamDiTBlock(64, 2, qk_norm=False).state_dict()) == [k for k in KEYS if "_norm" not in k]


@pytest.mark.parametrize("lengths", [None, [0, 5, 2]])
@pytest.mark.parametrize("rope", ["image", "both", "none"])
def test_float64_block_equals_a_written_out_flux_block(lengths, rope):
    D, H, N, L = 144, 2, 7, 5  # head dim 72
    block = random_block(D, H, backend="reference").double()
    x, ctx, c = torch.randn(3, N, D, dtype=torch.float64), torch.randn(3, L, D, dtype=torch.float64), torch.randn(
        3, D, dtype=torch.float64)
    lengths = None if lengths is None else torch.tensor(lengths)
    img_freqs = None if rope == "none" else rope_freqs_2d(N, 1, D // H)
    txt_freqs = rope_freqs_1d(L, D // H, offset=3) if rope == "both" else None
    out = block(x, ctx, c, lengths, img_freqs, txt_freqs)
    want = stock_single_block(block.state_dict(), x, ctx, c, lengths, img_freqs, txt_freqs, H)
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w, rtol=1e-12, atol=1e-12)


def _run(fn, params, x64, ctx64, c64, lengths, img_freqs, dtype, cotangents64):
    """Outputs of ``fn(x, context, c, ...)`` and the gradients of <outputs, cotangents> with respect to the
    three inputs and every tensor of ``params`` (name -> leaf)."""
    x, ctx, c = (t.to(dtype).requires_grad_() for t in (x64, ctx64, c64))
    out = fn(x, ctx, c, lengths, img_freqs, None)
    loss = sum((o * g.to(dtype)).sum() for o, g in zip(out, cotangents64))
    names = list(params)
    grads = torch.autograd.grad(loss, [x, ctx, c, *params.values()])
    return {"out_x": out[0], "out_context": out[1],
            **dict(zip(["dx", "dcontext", "dc"] + ["d" + n for n in names], grads))}


# (backend, dtype, head dim, caption lengths). The Triton interpreter computes tl.dot on bfloat16 wrongly:
# the triton backend is tested in float16/float32 on CPU (bf16 takes the reference math there anyway).
CASES = ([("triton", torch.float32, hd, [0, 5, 2]) for hd in (64, 72, 80, 96, 128)]
         + [("triton", torch.float16, 96, [5, 0, 3])]
         + [("triton", torch.float32, 72, None)]
         + [("reference", dt, hd, [0, 5, 2]) for dt in (torch.float32, torch.bfloat16) for hd in (72, 128)]
         + [("reference", torch.bfloat16, 64, None)])


@pytest.mark.parametrize("backend,dtype,head_dim,lengths", CASES)
def test_output_and_every_gradient_follow_the_2x_rule(backend, dtype, head_dim, lengths):
    """Truth: the block in float64 (reference backend; equal to the written-out block above). The
    same-dtype reference: the written-out block in the test dtype, so the reference backend is measured too.
    Whole-block composites in float32 get the 1e-5 floor of tests/modules/test_blocks.py."""
    H, N, L, B = 2, 7, 5, 3
    D = H * head_dim
    block64 = random_block(D, H, backend="reference").double()
    ours = SingleStreamDiTBlock(D, H, backend=backend).to(dtype)
    ours.load_state_dict(block64.state_dict())
    x64, ctx64 = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    c64 = torch.randn(B, D, dtype=torch.float64)
    lengths = None if lengths is None else torch.tensor(lengths)
    img_freqs = rope_freqs_2d(N, 1, head_dim)
    cot = [torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)]

    args = (x64, ctx64, c64, lengths, img_freqs)
    truth = _run(block64, dict(block64.named_parameters()), *args, torch.float64, cot)
    got = _run(ours, dict(ours.named_parameters()), *args, dtype, cot)
    stock_params = {k: v.detach().to(dtype).requires_grad_() for k, v in block64.named_parameters()}
    same_dtype = _run(lambda *a: stock_single_block(stock_params, *a, heads=H), stock_params, *args, dtype, cot)
    assert set(got) == set(truth) == set(same_dtype) and len(got) == 3 + 2 + len(KEYS)
    floor = 1e-5 if dtype == torch.float32 else None
    for name in truth:
        assert_close_to_reference(got[name], same_dtype[name], truth[name], name=name, floor=floor)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padded_caption_tokens_take_no_part_even_as_nan(backend):
    D, H, N, L = 128, 2, 6, 4
    block = random_block(D, H, backend=backend)
    x, ctx, c = torch.randn(2, N, D), torch.randn(2, L, D), torch.randn(2, D)
    lengths = torch.tensor([2, 0])
    real = torch.arange(L) < lengths[:, None]
    poisoned = ctx.clone()
    poisoned[~real] = float("nan")
    freqs = rope_freqs_2d(2, 3, D // H)
    x1, c1 = x.clone().requires_grad_(), ctx.clone().requires_grad_()
    x2, c2 = x.clone().requires_grad_(), poisoned.clone().requires_grad_()
    out1 = block(x1, c1, c, lengths, freqs)
    out2 = block(x2, c2, c, lengths, freqs)
    torch.testing.assert_close(out2[0], out1[0], rtol=0, atol=0)
    torch.testing.assert_close(out2[1][real], out1[1][real], rtol=0, atol=0)
    assert torch.equal(out1[1][~real], ctx[~real])  # padded rows come back unchanged
    assert out2[1][~real].isnan().all()
    grads = []
    for xx, cc, out in ((x1, c1, out1), (x2, c2, out2)):
        loss = out[0].square().sum() + torch.where(real[..., None], out[1], 0.0).square().sum()
        grads.append(torch.autograd.grad(loss, [xx, cc, *block.parameters()]))
    for g1, g2 in zip(*grads):
        assert torch.isfinite(g2).all()
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)
    assert (grads[0][1][~real] == 0).all()


def test_truncated_caption_equals_the_padded_one():
    """A padded caption with lengths gives the outputs of the caption cut to its real tokens."""
    D, H, N, L = 128, 2, 5, 6
    block = random_block(D, H, backend="reference").double()
    x, ctx, c = (torch.randn(1, N, D, dtype=torch.float64), torch.randn(1, L, D, dtype=torch.float64),
                 torch.randn(1, D, dtype=torch.float64))
    freqs = rope_freqs_2d(N, 1, D // H)
    padded = block(x, ctx, c, torch.tensor([4]), freqs)
    cut = block(x, ctx[:, :4], c, None, freqs)
    torch.testing.assert_close(padded[0], cut[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded[1][:, :4], cut[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dispatch_goes_where_the_backend_says(backend, fast_path_calls, recorder):
    block = random_block(64, 1, backend=backend)
    args = (torch.randn(2, 4, 64, requires_grad=True), torch.randn(2, 3, 64), torch.randn(2, 64),
            torch.tensor([1, 3]), rope_freqs_2d(2, 2, 64), None)
    with recorder() as rec:
        out = block(*args)
        (out[0].sum() + out[1].sum()).backward()
    if backend == "reference":
        assert fast_path_calls == []
    else:  # QK-norm and RoPE inside the fused attention kernel; LayerNorm+modulate in fastdit's op
        assert set(fast_path_calls) == {("attention", "forward"), ("attention", "backward"), ("adaln", "forward"),
                                        ("adaln", "backward")}
        assert "aten.native_layer_norm" not in rec.ops and "aten._fused_rms_norm" not in rec.ops


def test_set_module_backend_reaches_the_block():
    model = torch.nn.Sequential(SingleStreamDiTBlock(64, 1, backend="reference"))
    set_module_backend(model, "triton")
    assert model[0].backend == "triton" and model[0].q_norm.backend == "triton" and model[0].norm.backend == "triton"


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    block = random_block(64, 1, backend="triton")
    explained = torch._dynamo.explain(block)(torch.randn(2, 9, 64), torch.randn(2, 5, 64), torch.randn(2, 64),
                                             torch.tensor([0, 5]), rope_freqs_2d(3, 3, 64), None)
    assert explained.graph_break_count == 0, explained.break_reasons
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert "fastdit.joint_attention_qk" in targets
    torch._dynamo.reset()


def test_bad_inputs_raise_clear_errors():
    block = SingleStreamDiTBlock(64, 2)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        SingleStreamDiTBlock(64, 3)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 64\)"):
        block(torch.randn(2, 4, 32), torch.randn(2, 3, 64), torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"context must be \(B, N_txt, 64\) with B = 2"):
        block(torch.randn(2, 4, 64), torch.randn(3, 3, 64), torch.randn(2, 64))
