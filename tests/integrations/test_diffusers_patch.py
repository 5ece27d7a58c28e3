"""apply_fastdit on tiny diffusers transformers built from scratch (random weights, no downloads): the
patched model computes what the stock one does (forward and every parameter gradient, float64 truth,
2x rule), keeps its state dict, and unpatches to the stock model; LoRA, gradient checkpointing and
torch.compile keep working; what it cannot patch is reported."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel
from fastdit.integrations.diffusers import apply_fastdit, fastdit_patched, is_patched, unpatch_fastdit
from fastdit.integrations.diffusers import patch as fd_patch
from fastdit.testing import assert_close_to_reference, group_scale

HEAD_DIM = 64  # a head size the Triton kernels take (64, 72, 80, 96, 128)
B = 2


def _perturb_(model: nn.Module) -> nn.Module:
    """Random weights everywhere (diffusers zero-initialises some layers; norms start at 1)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.add_(torch.randn(p.shape, generator=g) * (0.5 / fan_in ** 0.5 if p.dim() > 1 else 0.1))
    return model


def tiny_flux():
    return _perturb_(FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                            attention_head_dim=HEAD_DIM, num_attention_heads=2,
                                            joint_attention_dim=24, pooled_projection_dim=12,
                                            axes_dims_rope=(8, 28, 28)))


def tiny_sd3(sd35: bool = False):
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    return _perturb_(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                           attention_head_dim=HEAD_DIM, num_attention_heads=2,
                                           joint_attention_dim=24, caption_projection_dim=2 * HEAD_DIM,
                                           pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16,
                                           **extra))


def tiny_dit():
    return _perturb_(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4,
                                           out_channels=8, num_layers=2, sample_size=6, patch_size=2,
                                           num_embeds_ada_norm=10))


def flux_inputs(padded: bool):
    h, w, L = 3, 5, 7  # odd image grid, odd caption length
    inputs = dict(hidden_states=torch.randn(B, h * w, 8), encoder_hidden_states=torch.randn(B, L, 24),
                  pooled_projections=torch.randn(B, 12), timestep=torch.rand(B),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)),
                                                     indexing="ij"), -1).reshape(-1, 3).float(),
                  txt_ids=torch.zeros(L, 3))
    if padded:  # sample 0: 3 real caption tokens, sample 1: all 7; image keys always kept
        keep = torch.ones(B, L + h * w, dtype=torch.bool)
        keep[0, 3:L] = False
        inputs["joint_attention_kwargs"] = {"attention_mask": keep[:, None, None, :]}
    return inputs


def sd3_inputs(padded: bool):
    return dict(hidden_states=torch.randn(B, 4, 6, 10), encoder_hidden_states=torch.randn(B, 5, 24),
                pooled_projections=torch.randn(B, 12), timestep=torch.rand(B) * 1000)


def dit_inputs(padded: bool):
    return dict(hidden_states=torch.randn(B, 4, 6, 6), timestep=torch.rand(B) * 1000,
                class_labels=torch.tensor([3, 10]))  # 10 = the null class


MODELS = {"flux": (tiny_flux, flux_inputs), "sd3": (tiny_sd3, sd3_inputs),
          "sd35": (lambda: tiny_sd3(sd35=True), sd3_inputs), "dit": (tiny_dit, dit_inputs)}


def _cast(inputs, dtype, device=None):
    """Floating-point inputs (nested dicts too) to ``dtype``; every tensor to ``device``."""
    def cast(v):
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        return v
    return {k: cast(v) for k, v in inputs.items()}


def _run(model, inputs, weight):
    """Output and every parameter gradient of sum(output * weight)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    (out * weight.to(out.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _stock_and_truth(name, dtype, padded, device):
    """The stock model in ``dtype`` on ``device``, its inputs, the cotangent, and the float64 truth and the
    stock low-precision result (output and every parameter gradient)."""
    build, make_inputs = MODELS[name]
    stock = build().eval()
    inputs = make_inputs(padded)
    model64 = copy.deepcopy(stock).double().to(device)
    inputs64 = _cast(inputs, torch.float64, device)
    with torch.no_grad():
        shape = model64(**inputs64, return_dict=False)[0].shape
    weight = torch.randn(shape, dtype=torch.float64, device=device)
    truth = _run(model64, inputs64, weight)
    stock = stock.to(device=device, dtype=dtype)
    return stock, _cast(inputs, dtype, device), weight, truth, _run(stock, _cast(inputs, dtype, device), weight)


CASES = [(name, padded) for name in MODELS for padded in ([False, True] if name == "flux" else [False])]
# (only Flux's processor takes a caption mask: SD3's stock processor ignores it, DiT has none)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# (bf16 on the GPU only: the Triton interpreter's bf16 tl.dot is wrong)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name,padded", CASES, ids=[f"{n}-{'padded' if p else 'full'}" for n, p in CASES])
def test_patched_model_matches_stock(name, padded, backend, dtype, device):
    stock, inputs, weight, (out64, grads64), (out_lp, grads_lp) = _stock_and_truth(name, dtype, padded, device)
    patched = copy.deepcopy(stock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in these models may be left stock
        report = apply_fastdit(patched, backend=backend)
    assert is_patched(patched) and not report.left_stock
    out, grads = _run(patched, inputs, weight)
    assert_close_to_reference(out, out_lp, out64, name=f"{name} output")
    assert set(grads) == set(grads64)
    scale = group_scale(grads64.values())
    for key in grads64:
        assert_close_to_reference(grads[key], grads_lp[key], grads64[key], name=f"d {key}", scale=scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_report_counts_what_it_patched(name):
    model = MODELS[name][0]()
    report = apply_fastdit(model, backend="reference")
    expected = {
        "flux": {"AdaLayerNormZero": 4, "AdaLayerNormZeroSingle": 2, "AdaLayerNormContinuous": 1,
                 "FluxTransformerBlock": 2, "FluxSingleTransformerBlock": 2, "FluxAttnProcessor": 4},
        "sd3": {"AdaLayerNormZero": 3, "AdaLayerNormContinuous": 2, "JointTransformerBlock": 2,
                "JointAttnProcessor2_0": 2},
        "sd35": {"AdaLayerNormZero": 2, "SD35AdaLayerNormZeroX": 1, "AdaLayerNormContinuous": 2,
                 "JointTransformerBlock": 2, "JointAttnProcessor2_0": 3},
        "dit": {"AdaLayerNormZero": 2, "BasicTransformerBlock": 2, "AttnProcessor2_0": 2},
    }[name]
    assert report.patched == expected, str(report)
    assert "fastdit patched" in str(report)


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_unchanged_and_unpatch_restores_stock(name):
    build, make_inputs = MODELS[name]
    stock = build().eval()
    inputs = make_inputs(False)
    with torch.no_grad():
        expected = stock(**inputs, return_dict=False)[0]
    model = copy.deepcopy(stock)
    classes = {n: type(m) for n, m in model.named_modules()}
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    apply_fastdit(model, backend="reference")
    state = model.state_dict()
    assert list(state) == list(stock.state_dict())
    fresh = build()
    fresh.load_state_dict(state, strict=True)  # a patched model's weights load into a stock one
    assert unpatch_fastdit(model) > 0
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(model.get_submodule(n).processor is p for n, p in processors.items())
    assert not is_patched(model) and unpatch_fastdit(model) == 0
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], expected)  # the stock code again, bitwise


def test_context_manager_unpatches_even_when_the_body_raises():
    model = tiny_dit()
    with pytest.raises(RuntimeError, match="boom"):
        with fastdit_patched(model, backend="reference") as report:
            assert is_patched(model) and report.patched
            raise RuntimeError("boom")
    assert not is_patched(model)


def test_patching_twice_only_changes_the_backend():
    model = tiny_flux()
    apply_fastdit(model, backend="reference")
    report = apply_fastdit(model, backend="auto")
    assert report.patched["FluxTransformerBlock"] == 2
    block = model.transformer_blocks[0]
    assert block._fastdit_stock is fd_patch._d_flux.FluxTransformerBlock  # not a patch of a patch
    assert block._fastdit_backend == "auto" and block.attn.processor.backend == "auto"
    assert unpatch_fastdit(model) == 2 + 2 + 4 + 2 + 1 + 4  # blocks, their norms, single norms, norm_out, processors
    assert type(block) is fd_patch._d_flux.FluxTransformerBlock


def test_unknown_processors_are_left_stock_and_reported():
    model = tiny_flux()

    class CustomProcessor(fd_patch._d_flux.FluxAttnProcessor):  # a subclass may do anything: not ours to patch
        pass

    model.transformer_blocks[1].attn.set_processor(CustomProcessor())
    with pytest.warns(UserWarning, match=r"transformer_blocks\.1\.attn processor.*CustomProcessor"):
        report = apply_fastdit(model, backend="reference")
    assert report.patched["FluxAttnProcessor"] == 3
    assert isinstance(model.transformer_blocks[1].attn.processor, CustomProcessor)


def test_a_model_with_nothing_to_patch_is_a_named_error():
    with pytest.raises(ValueError, match=r"nothing in Sequential is patchable.*FluxTransformer2DModel"):
        apply_fastdit(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="unknown fastdit backend 'fast'"):
        apply_fastdit(tiny_dit(), backend="fast")


def test_unrepresentable_attention_masks_run_the_stock_processor():
    """A mask that hides image keys (not caption padding) is the stock processor's business."""
    stock = tiny_flux().eval()
    inputs = flux_inputs(False)
    keep = torch.ones(B, 7 + 15, dtype=torch.bool)
    keep[1, 9] = False  # an image key
    inputs["joint_attention_kwargs"] = {"attention_mask": keep[:, None, None, :]}
    with torch.no_grad():
        expected = stock(**inputs, return_dict=False)[0]
        apply_fastdit(stock, backend="reference")
        got = stock(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_flux()
    apply_fastdit(model, backend="reference")
    inputs = flux_inputs(True)
    weight = torch.randn(B, 15, 8)
    out, grads = _run(model, inputs, weight)
    model.enable_gradient_checkpointing()
    out_ckpt, grads_ckpt = _run(model, inputs, weight)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key], rtol=1e-6, atol=1e-7)


def test_peft_lora_adapters_work_on_a_patched_model():
    import peft  # in the test extra: this test must run, not skip
    stock = tiny_flux()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"],
                             init_lora_weights=False)  # random B too: the adapter changes the output
    stock.add_adapter(config)
    inputs = flux_inputs(True)
    weight = torch.randn(B, 15, 8)
    out_stock, grads_stock = _run(stock, inputs, weight)
    patched = copy.deepcopy(stock)
    apply_fastdit(patched, backend="reference")
    out, grads = _run(patched, inputs, weight)
    torch.testing.assert_close(out, out_stock, rtol=1e-5, atol=1e-5)
    lora = [k for k in grads_stock if "lora_" in k]
    assert lora and set(lora) <= set(grads)
    for key in lora:
        torch.testing.assert_close(grads[key], grads_stock[key], rtol=1e-4, atol=1e-6)
    assert list(patched.state_dict()) == list(stock.state_dict())


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_torch_compile_traces_the_patched_model(name):
    """Dynamo traces the patched blocks, norms and processors (aot_eager: no C++ compiler needed on CPU)."""
    build, make_inputs = MODELS[name]
    model = build().eval()
    apply_fastdit(model, backend="reference")
    inputs = make_inputs(False)
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        got = compiled(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_caption_key_mask_conversion():
    n_txt, n_total = 3, 7
    keep = torch.ones(2, n_total, dtype=torch.bool)
    keep[0, 1:3] = False
    ok, txt = fd_patch._caption_key_mask(keep[:, None, None, :], 2, n_txt, n_total)
    assert ok and txt.tolist() == [[True, False, False], [True, True, True]]
    additive = torch.zeros(2, 1, n_total).masked_fill(~keep[:, None, :], float("-inf"))
    assert fd_patch._caption_key_mask(additive, 2, n_txt, n_total)[1].tolist() == txt.tolist()
    assert not fd_patch._caption_key_mask(torch.full((2, n_total), 0.5), 2, n_txt, n_total)[0]  # soft bias
    assert not fd_patch._caption_key_mask(torch.ones(2, 1, n_total, n_total, dtype=torch.bool), 2, n_txt,
                                          n_total)[0]  # per-query mask
    image_hidden = keep.clone()
    image_hidden[1, 5] = False
    assert not fd_patch._caption_key_mask(image_hidden, 2, n_txt, n_total)[0]
