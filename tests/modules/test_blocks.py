"""DiTBlock and JointDiTBlock: stock state dicts load strictly and give the same outputs and grads;
dispatch goes where the backend says; compiled blocks have no graph breaks."""
import copy

import pytest
import torch

from fastdit.modules import DiTBlock, JointDiTBlock
from fastdit.ops import rope_freqs_1d, rope_freqs_2d
from fastdit.testing import assert_close_to_reference

DIT_KEYS = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
            "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight",
            "adaLN_modulation.1.bias"]


def test_dit_block_state_dict_keys_are_the_official_ones(stock):
    assert list(DiTBlock(64, 4).state_dict()) == DIT_KEYS
    assert list(stock.DiTBlock(64, 4).state_dict()) == DIT_KEYS


def test_joint_block_state_dict_keys_are_stable(stock):
    keys = list(JointDiTBlock(64, 2).state_dict())
    assert keys == ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                    "attn.q_norm.weight", "attn.k_norm.weight", "attn.txt_qkv.weight", "attn.txt_qkv.bias",
                    "attn.txt_proj.weight", "attn.txt_proj.bias", "attn.txt_q_norm.weight",
                    "attn.txt_k_norm.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                    "txt_mlp.fc1.weight", "txt_mlp.fc1.bias", "txt_mlp.fc2.weight", "txt_mlp.fc2.bias",
                    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias", "txt_adaLN_modulation.1.weight",
                    "txt_adaLN_modulation.1.bias"]
    assert sorted(keys) == sorted(stock.JointBlock(64, 2).state_dict())


def test_fresh_dit_block_is_the_identity():
    """AdaLN-Zero: zero-initialised modulation means every gate is 0 at the start."""
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(DiTBlock(64, 4)(x, torch.randn(2, 64)), x, rtol=0, atol=0)


def _grads_by_name(loss, inputs, module):
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, [*inputs, *params])
    return list(grads[:len(inputs)]), dict(zip(names, grads[len(inputs):]))


def _check_like_stock(ours_out, stock_out_lowp, stock_out64, name):
    """float64 runs must agree to rounding; low-precision runs follow the 2x rule against float64.

    A whole block composes many ops, and its float32 error is noise that moves ~3x between seeds
    (for the stock block too): the fp32 floor is 1e-5 of the magnitude here (1e-6 per op), still far
    below what any wrong formula gives."""
    if ours_out.dtype == torch.float64:
        torch.testing.assert_close(ours_out, stock_out64, rtol=1e-9, atol=1e-9, msg=name)
    else:
        floor = 1e-5 if ours_out.dtype == torch.float32 else None
        assert_close_to_reference(ours_out, stock_out_lowp, stock_out64, name=name, floor=floor)


# The library ops ("triton") take float16/bfloat16/float32 only, so they run in float32 here.
CASES = [("reference", torch.float64), ("auto", torch.float64), ("triton", torch.float32),
         ("reference", torch.float32)]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("N", [1, 7, 113])
def test_dit_block_matches_the_official_block(backend, dtype, N, stock, device):
    stock64 = stock.randomize_(stock.DiTBlock(144, 2), std=0.1).to(device, torch.float64)  # head dim 72 (DiT-XL)
    stock = copy.deepcopy(stock64).to(dtype)
    ours = DiTBlock(144, 2, backend=backend).to(device, dtype)
    ours.load_state_dict(stock.state_dict(), strict=True)
    x64 = torch.randn(2, N, 144, dtype=torch.float64, device=device)
    c64 = torch.randn(2, 144, dtype=torch.float64, device=device)
    runs = {}
    for tag, module, dt in (("ours", ours, dtype), ("stock", stock, dtype), ("stock64", stock64, torch.float64)):
        x, c = x64.to(dt).requires_grad_(), c64.to(dt).requires_grad_()
        out = module(x, c)
        runs[tag] = (out, *_grads_by_name((out * out).sum(), [x, c], module))
    _check_like_stock(runs["ours"][0], runs["stock"][0], runs["stock64"][0], "out")
    for i, name in enumerate(("dx", "dc")):
        _check_like_stock(runs["ours"][1][i], runs["stock"][1][i], runs["stock64"][1][i], name)
    for name, grad in runs["ours"][2].items():
        _check_like_stock(grad, runs["stock"][2][name], runs["stock64"][2][name], "d" + name)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("N", [1, 37])
def test_residual_carry_matches_adding_the_residual_in_each_block(backend, dtype, N, stock, device):
    """Two DiT blocks and the final layer, each block's MLP residual deferred into the next fused norm
    (what DiT.forward does), against the blocks adding it themselves: float64 to rounding; lower
    precision within the 2x rule of the plain chain's error against float64, outputs and every gradient."""
    from fastdit.models.layers import FinalLayer

    D = 144

    def parts_with(b):
        return torch.nn.ModuleList([DiTBlock(D, 2, backend=b) for _ in range(2)] + [FinalLayer(D, 2, 4, backend=b)])

    parts64 = stock.randomize_(parts_with("reference"), std=0.1).to(device, torch.float64)
    parts = parts_with(backend).to(device, dtype)
    parts.load_state_dict(parts64.state_dict())
    x64 = torch.randn(2, N, D, dtype=torch.float64, device=device)
    c64 = torch.randn(2, D, dtype=torch.float64, device=device)

    def run(parts, dt, carry):
        x, c = x64.to(dt).requires_grad_(), c64.to(dt).requires_grad_()
        h, pending = x, None
        for block in parts[:2]:
            if carry:
                h, pending = block(h, c, None, pending, True)
            else:
                h = block(h, c)
        out = parts[2](h, c, pending)
        return (out, *_grads_by_name((out * out).sum(), [x, c], parts))

    carried, plain, truth = run(parts, dtype, True), run(parts, dtype, False), run(parts64, torch.float64, False)
    _check_like_stock(carried[0], plain[0], truth[0], "out")
    for i, name in enumerate(("dx", "dc")):
        _check_like_stock(carried[1][i], plain[1][i], truth[1][i], name)
    for name, grad in carried[2].items():
        _check_like_stock(grad, plain[2][name], truth[2][name], "d" + name)


@pytest.mark.parametrize("backend,dtype", CASES[:1] + CASES[2:3])
def test_joint_residual_carry_matches_adding_the_residuals_in_each_block(backend, dtype, stock, device):
    """Two joint blocks with both streams' MLP residuals deferred into the next block's fused norms (what
    MMDiT.forward does), resolved at the end, against the blocks adding them: outputs and every gradient."""
    from fastdit.modules.blocks import add_pending

    D = 128

    def blocks_with(b):
        return torch.nn.ModuleList(JointDiTBlock(D, 2, backend=b) for _ in range(2))

    blocks64 = stock.randomize_(blocks_with("reference"), std=0.1).to(device, torch.float64)
    blocks = blocks_with(backend).to(device, dtype)
    blocks.load_state_dict(blocks64.state_dict())
    inputs64 = [torch.randn(2, 9, D, dtype=torch.float64, device=device),
                torch.randn(2, 5, D, dtype=torch.float64, device=device),
                torch.randn(2, D, dtype=torch.float64, device=device)]
    mask = torch.tensor([2, 5], device=device)
    freqs = rope_freqs_2d(3, 3, D // 2, device=device)

    def run(parts, dt, carry):
        x, ctx, c = (t.to(dt).requires_grad_() for t in inputs64)
        h, hc, pending = x, ctx, None
        for block in parts:
            if carry:
                h, hc, pending = block(h, hc, c, mask, freqs, None, pending, True)
            else:
                h, hc = block(h, hc, c, mask, freqs, None)
        if carry:
            h, hc = add_pending(h, pending[0]), add_pending(hc, pending[1])
        out = torch.cat([h, hc], 1)
        return (out, *_grads_by_name((out * out).sum(), [x, ctx, c], parts))

    carried, plain, truth = run(blocks, dtype, True), run(blocks, dtype, False), run(blocks64, torch.float64, False)
    _check_like_stock(carried[0], plain[0], truth[0], "out")
    for i, name in enumerate(("dx", "dcontext", "dc")):
        _check_like_stock(carried[1][i], plain[1][i], truth[1][i], name)
    for name, grad in carried[2].items():
        _check_like_stock(grad, plain[2][name], truth[2][name], "d" + name)


@pytest.mark.parametrize("backend,dtype", CASES[:1] + CASES[2:3])
@pytest.mark.parametrize("N_img,N_txt", [(9, 5), (1, 77), (6, 1)])
def test_joint_block_matches_a_stock_mmdit_block(backend, dtype, N_img, N_txt, stock, device):
    d, heads = 128, 2
    stock64 = stock.randomize_(stock.JointBlock(d, heads), std=0.1).to(device, torch.float64)
    stock = copy.deepcopy(stock64).to(dtype)
    ours = JointDiTBlock(d, heads, backend=backend).to(device, dtype)
    ours.load_state_dict(stock.state_dict(), strict=True)
    x64 = torch.randn(3, N_img, d, dtype=torch.float64, device=device)
    ctx64 = torch.randn(3, N_txt, d, dtype=torch.float64, device=device)
    c64 = torch.randn(3, d, dtype=torch.float64, device=device)
    lengths = torch.tensor([0, N_txt, max(N_txt // 2, 1)], device=device)
    img_freqs = rope_freqs_2d(N_img, 1, d // heads, device=device)
    txt_freqs = rope_freqs_1d(N_txt, d // heads, device=device)
    # the outputs of real caption tokens drive the loss; padded caption outputs are ignored by design
    real = (torch.arange(N_txt, device=device) < lengths[:, None]).unsqueeze(-1)
    runs = {}
    for tag, module, dt in (("ours", ours, dtype), ("stock", stock, dtype), ("stock64", stock64, torch.float64)):
        x, ctx = x64.to(dt).requires_grad_(), ctx64.to(dt).requires_grad_()
        out_x, out_c = module(x, ctx, c64.to(dt), lengths, img_freqs, txt_freqs)
        loss = out_x.square().sum() + (out_c * real).square().sum()
        runs[tag] = (out_x, out_c * real, *_grads_by_name(loss, [x, ctx], module))
    for i, name in enumerate(("out_x", "out_ctx")):
        _check_like_stock(runs["ours"][i], runs["stock"][i], runs["stock64"][i], name)
    for i, name in enumerate(("dx", "dctx")):
        _check_like_stock(runs["ours"][2][i], runs["stock"][2][i], runs["stock64"][2][i], name)
    for name, grad in runs["ours"][3].items():
        _check_like_stock(grad, runs["stock"][3][name], runs["stock64"][3][name], "d" + name)


# fastdit.ops module -> what a JointDiTBlock forward+backward runs of it on the fast path (QK-norm and RoPE
# happen inside the attention kernel: qk_norm_rotary is not called)
FAST_PATH = {"adaln": {("adaln", "forward"), ("adaln", "backward")},
             "gated_adaln": {("gated_adaln", "forward"), ("gated_adaln", "backward")},
             "attention": {("attention", "forward"), ("attention", "backward")}}


def _joint_block_args(device):
    return (torch.randn(2, 4, 64, device=device), torch.randn(2, 3, 64, device=device),
            torch.randn(2, 64, device=device), torch.tensor([1, 3], device=device),
            rope_freqs_2d(2, 2, 64, device=device), None)


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_dispatch_goes_where_the_backend_says(backend, recorder, stock, device, fast_path_calls):
    import importlib

    block = stock.randomize_(JointDiTBlock(64, 1, backend=backend)).to(device)
    with recorder() as rec:
        block(*_joint_block_args(device))[0].sum().backward()
    library_ops = {op for op in rec.ops if op.startswith("fastdit.")}
    ran = set(fast_path_calls)
    if backend == "reference":
        assert ran == set() and library_ops == set()
    elif backend == "triton":  # eager: autograd.Functions around the fast path, not the library ops
        assert ran == set().union(*FAST_PATH.values()) and library_ops == set()
    else:  # auto: the fast path where a kernel exists, on CUDA only
        expected = set().union(*(calls for name, calls in FAST_PATH.items()
                                 if importlib.import_module(f"fastdit.ops.{name}").KERNEL_READY
                                 and device.type == "cuda"))
        assert ran == expected
        assert library_ops == set()


def test_compiled_block_graph_holds_the_library_ops(stock, device):
    """Under torch.compile the fast path is the torch.library ops, each one opaque node of the graph."""
    torch._dynamo.reset()
    block = stock.randomize_(JointDiTBlock(64, 1, backend="triton")).to(device)
    explained = torch._dynamo.explain(block)(*_joint_block_args(device))
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert {"fastdit.adaln_modulate", "fastdit.gated_residual_adaln", "fastdit.joint_attention_qk"} <= targets
    assert "fastdit.qk_norm_rope" not in targets  # fused into the attention op
    torch._dynamo.reset()


def test_fast_path_dit_block_runs_no_unfused_norm_modulate_or_rope_ops(recorder, stock, device, fast_path_calls):
    """Forward and backward of a DiT block (QK-norm and RoPE on) on the fast path: LayerNorm, modulate,
    RMSNorm and rotation all happen inside fastdit's fused ops; no aten op of theirs runs."""
    block = stock.randomize_(DiTBlock(128, 2, qk_norm=True, backend="triton"), std=0.05).to(device)
    x = torch.randn(2, 16, 128, device=device, requires_grad=True)
    c = torch.randn(2, 128, device=device)
    freqs = rope_freqs_2d(4, 4, 64, device=device)
    grad_out = torch.randn(2, 16, 128, device=device)
    with recorder() as rec:
        (block(x, c, freqs) * grad_out).sum().backward()
    ran = set(rec.ops)
    statistics = {"aten.native_layer_norm", "aten.layer_norm", "aten.native_layer_norm_backward", "aten.rsqrt",
                  "aten.var_mean", "aten.var", "aten.mean", "aten.pow", "aten._fused_rms_norm"}
    assert not ran & statistics, sorted(ran & statistics)
    # the rotation (and its transpose in backward) happens only inside the fused kernels: no aten op
    # computes with the table (Triton's CPU interpreter stages kernel arguments with new_empty/copy_,
    # which move data and compute nothing)
    staging = {"aten.new_empty", "aten.copy_"}
    assert [op for op in rec.ops_reading(freqs) if op.startswith("aten.") and op not in staging] == []
    assert set(fast_path_calls) == set().union(*FAST_PATH.values())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_blocks_have_no_graph_breaks(backend, stock, device):
    torch._dynamo.reset()
    dit = stock.randomize_(DiTBlock(64, 1, backend=backend)).to(device)
    explained = torch._dynamo.explain(dit)(torch.randn(2, 9, 64, device=device), torch.randn(2, 64, device=device),
                                           rope_freqs_2d(3, 3, 64, device=device))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    joint = stock.randomize_(JointDiTBlock(64, 1, backend=backend)).to(device)
    explained = torch._dynamo.explain(joint)(
        torch.randn(2, 9, 64, device=device), torch.randn(2, 5, 64, device=device), torch.randn(2, 64, device=device),
        torch.tensor([0, 5], device=device), rope_freqs_2d(3, 3, 64, device=device),
        rope_freqs_1d(5, 64, device=device))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_blocks_take_a_new_batch_size_without_graph_breaks(backend, stock, device):
    """A second batch size recompiles with a symbolic batch dimension (automatic dynamic shapes): the
    input checks must not format symbolic sizes (a graph break, an error under fullgraph=True) — as
    when a trainer samples, or a loader's last batch is short."""
    torch._dynamo.reset()
    joint = stock.randomize_(JointDiTBlock(64, 1, backend=backend), std=0.05).to(device)
    compiled = torch.compile(joint, fullgraph=True, backend="aot_eager")
    freqs_img, freqs_txt = rope_freqs_2d(3, 3, 64, device=device), rope_freqs_1d(5, 64, device=device)
    for batch in (2, 3, 4):
        args = (torch.randn(batch, 9, 64, device=device), torch.randn(batch, 5, 64, device=device),
                torch.randn(batch, 64, device=device), torch.full((batch,), 3, device=device), freqs_img, freqs_txt)
        for out, want in zip(compiled(*args), joint(*args)):
            torch.testing.assert_close(out, want)
    torch._dynamo.reset()


def test_compiled_block_runs_forward_and_backward_like_eager(stock, device):
    """fullgraph=True compile (aot_eager: no C++ toolchain needed) through the library ops."""
    torch._dynamo.reset()
    block = stock.randomize_(DiTBlock(128, 2, backend="triton"), std=0.05).to(device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 128, requires_grad=True, device=device)
    c = torch.randn(2, 128, device=device)
    out, want = compiled(x, c), block(x, c)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_blocks_under_bf16_autocast_keep_an_fp32_residual_stream(backend, stock, device):
    """Under autocast the residual x stays fp32 while modulation and sublayer outputs come out of
    Linear layers in bf16: the fused ops must take that mix and match the stock block."""
    ours = stock.randomize_(DiTBlock(128, 2, backend=backend), std=0.05).to(device)
    theirs = stock.DiTBlock(128, 2).to(device)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 128, device=device, requires_grad=True)
    c = torch.randn(2, 128, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, want = ours(x, c), theirs(x, c)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=3e-2, atol=3e-2)
    (grad,) = torch.autograd.grad(out.square().mean(), x)
    (grad_want,) = torch.autograd.grad(want.square().mean(), x)
    torch.testing.assert_close(grad, grad_want, rtol=5e-2, atol=5e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_blocks_on_cuda_bf16_compile_fullgraph_matches_eager(backend, stock):
    """On the GPU: bf16 autocast, inductor, fullgraph — compiled and eager agree, gradients flow."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dit = stock.randomize_(DiTBlock(1152, 16, backend=backend), std=0.02).cuda()
    joint = stock.randomize_(JointDiTBlock(1536, 24, backend=backend), std=0.02).cuda()
    x, c = torch.randn(4, 256, 1152, device="cuda"), torch.randn(4, 1152, device="cuda")
    xi, xt, cj = (torch.randn(2, 256, 1536, device="cuda"), torch.randn(2, 77, 1536, device="cuda"),
                  torch.randn(2, 1536, device="cuda"))
    lengths = torch.tensor([0, 40], device="cuda")
    fi, ft = rope_freqs_2d(16, 16, 64, device="cuda"), rope_freqs_1d(77, 64, device="cuda")
    for module, args in ((dit, (x, c, rope_freqs_2d(16, 16, 72, device="cuda"))),
                         (joint, (xi, xt, cj, lengths, fi, ft))):
        compiled = torch.compile(module, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager_out = module(*args)
            compiled_out = compiled(*args)
        eager_out = eager_out if isinstance(eager_out, tuple) else (eager_out,)
        compiled_out = compiled_out if isinstance(compiled_out, tuple) else (compiled_out,)
        for e, o in zip(eager_out, compiled_out):
            assert torch.isfinite(o).all()
            torch.testing.assert_close(o.float(), e.float(), rtol=5e-2, atol=5e-2)
        sum(o.float().square().mean() for o in compiled_out).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    torch._dynamo.reset()
