"""FP8 mode (fastdit.modules.fp8): enable_fp8 switches the blocks' Linear layers in place (same parameters,
keys and checkpoints), the norms' fused FP8 inputs give exactly what the GEMM would quantise itself, the fast
path (Triton norms + torch._scaled_mm) matches the dequantising float64 reference on the output and every
parameter gradient, FP8 stays close to the model it replaces, and disable_fp8 restores the stock forward."""
import pytest
import torch

from fastdit.models import DiT, DiTConfig, MMDiT, MMDiTConfig
from fastdit.modules import DiTBlock, set_module_backend
from fastdit.modules.fp8 import Fp8Linear, disable_fp8, enable_fp8, fp8_enabled
from fastdit.testing import assert_close_to_reference

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2, num_classes=10)
# head dim 64: the smallest the Triton attention kernel takes (backend="triton" runs it in the interpreter)


def small_dit(backend, device="cpu", **overrides):
    model = DiT(DiTConfig(**{**SMALL, **overrides}), backend=backend)
    for p in model.parameters():  # AdaLN-Zero starts at the identity: randomise so every path matters
        torch.nn.init.normal_(p, std=0.1)
    return model.to(device).eval()  # no label dropout: every call sees the same labels


def dit_inputs(batch=3, device="cpu"):
    return (torch.randn(batch, 4, 8, 8).to(device), (torch.rand(batch) * 999).to(device),
            torch.randint(0, 10, (batch,)).to(device))


def test_enable_switches_the_block_linears_in_place_and_disable_restores_stock_bits():
    model = small_dit("reference")
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    x, t, y = dit_inputs()
    with torch.no_grad():
        stock = model(x, t, y)
    report = enable_fp8(model)
    assert len(report.linears) == 8 and report.blocks == ["blocks.0", "blocks.1"] and not report.skipped
    assert "fp8 (rowwise): 8 Linear layers in 2 blocks" in str(report)
    assert type(model.blocks[0].attn.qkv) is Fp8Linear and type(model.blocks[1].mlp.fc2) is Fp8Linear
    assert type(model.blocks[0].adaLN_modulation[1]) is torch.nn.Linear  # the modulation stays
    assert type(model.final_layer.linear) is torch.nn.Linear
    assert {name: p for name, p in model.named_parameters()} == params  # the same Parameter objects
    assert list(model.state_dict()) == keys and fp8_enabled(model)
    with torch.no_grad():
        fp8 = model(x, t, y)
    assert not torch.equal(fp8, stock)
    assert disable_fp8(model) == 8 and not fp8_enabled(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), stock)


def test_enable_fp8_refuses_a_model_without_blocks_and_unknown_recipes():
    with pytest.raises(ValueError, match="enable_fp8: Linear has no DiTBlock or JointDiTBlock"):
        enable_fp8(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown recipe 'fp4'"):
        enable_fp8(small_dit("reference"), recipe="fp4")


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_hp_wgrad", "tensorwise"])
def test_fused_fp8_inputs_equal_the_gemm_quantising_its_input(recipe):
    """With the norms' FP8 outputs (fp8_inputs) the block computes exactly what it computes when each GEMM
    quantises its own input: the fused kernel emits quantize_rows(h), bit for bit. Gradients too."""
    block = DiTBlock(128, 2)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    set_module_backend(block, "triton")
    enable_fp8(block, recipe)
    x = torch.randn(2, 9, 128, requires_grad=True)
    c = torch.randn(2, 128)
    fused = block(x, c)
    grads_fused = torch.autograd.grad(fused.square().sum(), [x, *block.parameters()])
    expected_inputs = recipe != "tensorwise"
    assert block.fp8_inputs is expected_inputs
    block.fp8_inputs = False
    plain = block(x, c)
    grads_plain = torch.autograd.grad(plain.square().sum(), [x, *block.parameters()])
    assert torch.equal(fused, plain)
    for a, b in zip(grads_fused, grads_plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_hp_wgrad"])
def test_fast_fp8_model_matches_the_float64_reference_output_and_every_gradient(recipe, device):
    """Fast path: Triton norms (the interpreter on CPU) emitting FP8 + torch._scaled_mm. Reference: the same
    model with backend="reference" (reference norms, dequantising fp8_linear_ref) in fp32, and in float64 as the
    truth; the quantised operands are the same in all three, so only accumulation differs (2x rule)."""
    fast = small_dit("triton", device)
    ref = small_dit("reference", device)
    ref.load_state_dict(fast.state_dict())
    enable_fp8(fast, recipe)
    enable_fp8(ref, recipe, backend="reference")
    ref64 = small_dit("reference", device).double()
    ref64.load_state_dict(fast.state_dict())
    enable_fp8(ref64, recipe, backend="reference")
    x, t, y = dit_inputs(device=device)
    out, out_ref, out64 = fast(x, t, y), ref(x, t, y), ref64(x.double(), t.double(), y)
    assert_close_to_reference(out, out_ref, out64, name="output")
    cot = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(fast.parameters()), cot, allow_unused=True)
    grads_ref = torch.autograd.grad(out_ref, list(ref.parameters()), cot, allow_unused=True)
    grads64 = torch.autograd.grad(out64, list(ref64.parameters()), cot.double(), allow_unused=True)
    for (name, _), g, gr, g64 in zip(fast.named_parameters(), grads, grads_ref, grads64):
        if g64 is None:
            assert g is None and gr is None, name
            continue
        assert_close_to_reference(g, gr, g64, name="d" + name)


def test_fp8_stays_close_to_the_model_it_replaces():
    """FP8 (e4m3 operands, e4m3 gradients) against the same weights in fp32. Each e4m3 operand carries a
    relative rounding error of up to 2^-4 (about 3.6% RMS), so each GEMM's output about 5%, through 8 GEMMs and
    the network's gains: measured 6% for the output here. The bounds (15% output, 30% gradient) only catch a
    broken path (a wrong scale or layout gives errors of order 100%)."""
    model = small_dit("triton")
    x, t, y = dit_inputs(4)
    out = model(x, t, y)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    enable_fp8(model)
    out8 = model(x, t, y)
    grads8 = torch.autograd.grad(out8.square().mean(), list(model.parameters()))
    rel = ((out8 - out).norm() / out.norm()).item()
    assert rel < 0.15, rel
    g, g8 = torch.cat([a.flatten() for a in grads]), torch.cat([a.flatten() for a in grads8])
    assert ((g8 - g).norm() / g.norm()).item() < 0.3, ((g8 - g).norm() / g.norm()).item()


def test_joint_blocks_switch_both_streams_and_keep_padding_right():
    torch.manual_seed(0)
    cfg = MMDiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2,
                      caption_dim=32)
    model = MMDiT(cfg, backend="triton")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    report = enable_fp8(model)
    # SD3's last block (context-pre-only) is left as it is, and said so
    assert report.blocks == ["blocks.0"] and len(report.linears) == 8 and "blocks.0.attn.txt_qkv" in report.linears
    assert report.skipped == ["blocks.1 (ContextPreOnlyJointBlock: not switched by this FP8 mode)"]
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    context, mask = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(x, t, context, mask)
    garbage = context.clone()
    garbage[0, 3:] = 1e4  # padded caption tokens influence nothing, in FP8 mode too
    torch.testing.assert_close(model(x, t, garbage, mask), out, rtol=0, atol=0)
    out.square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_an_fp8_block_compiles_whole_and_matches_eager():
    """torch.compile(fullgraph=True) traces an FP8 block (the trainer compiles each block so): no graph break,
    and the same output and gradients as eager (aot_eager: the traced ops run as they are)."""
    block = DiTBlock(128, 2)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    enable_fp8(block)
    x, c = torch.randn(2, 9, 128, requires_grad=True), torch.randn(2, 128)
    eager = block(x, c)
    grads_eager = torch.autograd.grad(eager.square().sum(), [x, *block.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, c)
    grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    assert torch.equal(out, eager)
    for g, ge in zip(grads, grads_eager):
        assert torch.equal(g, ge)


def test_a_layer_cuda_cannot_take_stays_in_bf16_and_the_block_still_runs(monkeypatch):
    """On CUDA a layer whose sizes are not multiples of 16 stays nn.Linear (listed in the report); the block's
    norms still emit FP8 rows for the others, and that layer simply takes its bf16 input."""
    import fastdit.modules.fp8 as fp8

    assert fp8._layer_skip_reason(torch.nn.Linear(64, 100), torch.device("cuda"), None) == (
        "out (N) = 100 not a multiple of 16; torch._scaled_mm on CUDA needs K and N multiples of 16")
    assert fp8._layer_skip_reason(torch.nn.Linear(72, 100), torch.device("cpu"), None) is None
    monkeypatch.setattr(fp8, "_layer_skip_reason",
                        lambda layer, device, backend: "too odd" if layer.out_features == 512 else None)
    block = DiTBlock(128, 2)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    report = enable_fp8(block)
    assert report.skipped == ["mlp.fc1 (too odd)"] and type(block.mlp.fc1) is torch.nn.Linear
    assert type(block.attn.qkv) is Fp8Linear and block.fp8_inputs
    x, c = torch.randn(2, 9, 128, requires_grad=True), torch.randn(2, 128)
    block(x, c).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_gpu_without_fp8_tensor_cores_is_refused_at_start_up(monkeypatch):
    import fastdit.modules.fp8 as fp8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match="FP8 GEMMs need compute capability >= 8.9 .* NVIDIA A100-SXM4-80GB is "
                                         "sm_80: train with precision=bf16"):
        fp8._check_device(torch.device("cuda"), None, fp8.Fp8Report("rowwise"))
    report = fp8.Fp8Report("rowwise")
    fp8._check_device(torch.device("cpu"), None, report)
    assert report.notes == ["on the CPU: torch._scaled_mm dequantises (the FP8 numerics, not its speed)"]


def test_inference_quantises_each_weight_once_and_again_when_it_changes():
    """Without gradients an Fp8Linear keeps quantize_rows(weight) between calls (sampling: once, not every
    step): the same output as quantising afresh, and a new quantisation after the weight changes in place."""
    layer = torch.nn.Linear(64, 48)
    layer.__class__ = Fp8Linear
    x = torch.randn(5, 64)
    fresh = layer(x)  # grad enabled and weight.requires_grad: no cache
    assert "_fp8_weight" not in layer.__dict__
    with torch.no_grad():
        cached = layer(x)
        data_first = layer.quantized_weight()[0]
        assert layer(x).data_ptr() != cached.data_ptr() and layer.quantized_weight()[0] is data_first  # reused
        assert torch.equal(cached, fresh)
        layer.weight.mul_(2)  # an in-place update (optimizer step, EMA swap, load_state_dict)
        assert layer.quantized_weight()[0] is not data_first
        torch.testing.assert_close(layer(x) - layer.bias, 2 * (cached - layer.bias), rtol=1e-2, atol=1e-2)


def test_fp8_sampling_stays_close_to_bf16_sampling():
    """Guided Euler sampling of a randomised DiT (every block live) under bf16 autocast, FP8 against bf16 from
    the same noise: a few percent apart (e4m3's rounding through 8 GEMMs and 4 steps), not more."""
    from fastdit.diffusion import RectifiedFlow, sample

    model = small_dit("auto")
    labels = torch.tensor([1, 2, 3])
    args = dict(cond={"y": labels}, uncond={"y": torch.full_like(labels, 10)}, cfg_scale=2.0, sampler="euler",
                steps=4, objective=RectifiedFlow(), seed=0, progress=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = sample(model, (3, 4, 8, 8), **args)
        enable_fp8(model)
        fp8 = sample(model, (3, 4, 8, 8), **args)
    rel = ((fp8.float() - bf16.float()).norm() / bf16.float().norm()).item()
    assert 1e-3 < rel < 0.15, rel
