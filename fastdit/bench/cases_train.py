"""Training steps: fastdit's models against stock PyTorch / diffusers, one optimizer step per call.

The step (``benchmarks/train_step.py``'s): forward under bf16 autocast (fp32 weights; none on the CPU), MSE
on float32 outputs, backward, AdamW (fused on CUDA), ``zero_grad(set_to_none=True)``; the same batch every
call. Every peer starts from the same random weights (every path live: AdaLN and output layers are not
zero), loaded by state dict.

- ``train.dit-xl2`` (shape ``dit-xl2``): DiT-XL/2 on 4×32×32 latents (256 px), learn_sigma off, no label
  dropout; batch 128 on an 80 GB GPU, fewer where ``ctx.memory_bytes`` is smaller. Peers: ``fastdit``
  (``fastdit.models.DiT``, backend auto, eager), ``fastdit-compile`` (whole-model ``torch.compile``),
  ``fastdit-fp8-compile`` (the same with ``enable_fp8(model, "rowwise")``: FP8 GEMMs, fused FP8 inputs),
  ``eager`` / ``compile`` / ``compile-max-autotune`` (``stock.StockDiT``), ``torchao-float8``
  (``torchao.float8.convert_to_float8_training`` on the stock blocks' Linears, then ``torch.compile``).
  FLOPs: ``DiT.flops_per_sample(training=True)`` × batch (712 GFLOP per image: 3 × forward).
- ``train.mmdit`` (shape ``flux``): a Flux-width MMDiT (3072 wide, 24 heads of 128, T5 width 4096, CLIP
  pooled 768) with 4 double + 8 single blocks (fewer below 70 GB), 1024 px (4,096 image tokens) + 512
  caption tokens, batch 1: stock diffusers ``FluxTransformer2DModel`` against fastdit's ``MMDiT`` converted
  from it (``mmdit_from_flux``: the same weights, the same function). Compile is regional (each block), as
  diffusers' ``compile_repeated_blocks``. FLOPs: ``MMDiT.flops_per_sample(caption_len=512, training=True)``.

Items = images per step. Check: the loss of each peer's first step (identical weights and batch) against
the float32 stock model's, on a target that makes the loss sensitive to wrong outputs (``stock.loss_target``);
tolerance 10% relative under bf16 autocast (float8 included), 1e-3 in float32.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from fastdit.bench.registry import Case, Peer, Workload, register
from fastdit.bench.stock import (check_first_loss, compiled, CPU_GPU_ONLY, cpu_state, fresh, guard_size,
                                 loss_tolerance, MAX_AUTOTUNE, max_autotune_peer, on_gpu, optional_import,
                                 private_generator, randomize_, reference_loss_and_target, StockDiT, training_step)

GROUP = "train"

DIT_SHAPES = {"dit-xl2": dict(depth=28, hidden=1152, heads=16, latent=32, batch=None)}
DIT_QUICK = {"dit-xl2": dict(depth=1, hidden=128, heads=2, latent=8, batch=2)}
FLUX_SHAPES = {"flux": dict(double=4, single=8, heads=24, head_dim=128, grid=64, caption=512, txt_dim=4096,
                            pooled=768, channels=64, axes=(16, 56, 56), batch=1)}
FLUX_QUICK = {"flux": dict(double=1, single=1, heads=2, head_dim=64, grid=4, caption=4, txt_dim=32, pooled=16,
                           channels=16, axes=(8, 28, 28), batch=1)}
GiB = 2**30


def dit_batch(ctx, requested) -> int:
    """128 images on an 80 GB GPU (90% usable: 72 GB); about 0.45 GB per image beyond 12 GB of weights,
    gradients and AdamW states, in multiples of 8."""
    if requested:
        return int(requested)
    per_image, fixed = 0.45e9, 12e9
    fit = int((ctx.memory_bytes - fixed) / per_image) // 8 * 8
    return max(8, min(128, fit))


def _torchao_peer(ctx, build_model: Callable[[], nn.Module], prefixes, make_step) -> Peer:
    module, reason = optional_import("torchao.float8")
    if module is None:
        return Peer("torchao-float8", None, reason if "not installed" in reason else f"torchao: {reason}")
    if not on_gpu(ctx):
        return Peer("torchao-float8", None, f"torchao float8 training {CPU_GPU_ONLY} (float8 GEMMs need sm89+)")

    def keep(mod, fqn: str) -> bool:
        return (isinstance(mod, nn.Linear) and fqn.startswith(prefixes) and mod.in_features % 16 == 0
                and mod.out_features % 16 == 0)

    def build():
        model = build_model()
        module.convert_to_float8_training(model, module_filter_fn=keep)
        return make_step(model, torch.compile(model))
    return Peer("torchao-float8", build)


def make_dit(ctx, shape: str, p) -> Workload:
    from fastdit.models import DiT

    B = dit_batch(ctx, p["batch"])
    guard_size(ctx, 12 * p["depth"] * p["hidden"] ** 2 + B * p["latent"] ** 2 * p["hidden"], f"train.dit[{shape}]")
    cfg = dict(depth=p["depth"], hidden_size=p["hidden"], num_heads=p["heads"], input_size=p["latent"],
               learn_sigma=False, class_dropout_prob=0.0)
    template = fresh(lambda: DiT.from_name("DiT-XL/2", backend="auto", **cfg))
    randomize_(template, private_generator(ctx))
    state = cpu_state(template)
    flops = float(template.flops_per_sample(training=True)) * B
    del template

    def stock_model() -> nn.Module:
        model = fresh(lambda: StockDiT(p["depth"], p["hidden"], p["heads"], latent=p["latent"]))
        model.load_state_dict(state, strict=True)
        return model.to(ctx.device)

    def fastdit_model() -> nn.Module:
        model = fresh(lambda: DiT.from_name("DiT-XL/2", backend="auto", **cfg))
        model.load_state_dict(state, strict=True)
        return model.to(ctx.device)

    def fastdit_fp8_model() -> nn.Module:
        from fastdit.modules.fp8 import enable_fp8
        model = fastdit_model()
        enable_fp8(model, "rowwise")
        return model

    x = ctx.randn(B, 4, p["latent"], p["latent"], dtype=torch.float32)
    t = (torch.rand(B, generator=private_generator(ctx, 1)) * 1000).to(ctx.device)
    y = torch.randint(0, 1000, (B,), generator=private_generator(ctx, 2)).to(ctx.device)
    reference_loss, target = reference_loss_and_target(ctx, stock_model, lambda m: m(x, t, y))

    def make_step(model: nn.Module, call: nn.Module = None) -> Callable:
        call = model if call is None else call
        return training_step(model, ctx, lambda m: call(x, t, y), target)

    def peer(name: str, build_model: Callable[[], nn.Module], mode: str = "none") -> Peer:
        def build():
            model = build_model()
            if mode == "none":
                return make_step(model)
            return make_step(model, compiled(model, None if mode == "default" else mode))
        return Peer(name, build)

    peers = [peer("fastdit", fastdit_model), peer("fastdit-compile", fastdit_model, "default"),
             peer("fastdit-fp8-compile", fastdit_fp8_model, "default"),
             peer("eager", stock_model), peer("compile", stock_model, "default")]
    peers.append(max_autotune_peer(ctx, peer("compile-max-autotune", stock_model, MAX_AUTOTUNE).build))
    peers.append(_torchao_peer(ctx, stock_model, ("blocks",), make_step))
    return Workload(group=GROUP, name="train.dit-xl2", shape=shape,
                    dims=f"B={B} latent 4x{p['latent']}x{p['latent']} depth={p['depth']} D={p['hidden']} H={p['heads']}",
                    peers=peers, flops=flops, items=float(B), item_unit="img", reference=lambda: reference_loss,
                    check=check_first_loss(loss_tolerance(ctx)))


def flux_depth(ctx, p) -> Dict[str, int]:
    """4 double + 8 single blocks need ~40 GB of fp32 weights, gradients and AdamW states at Flux's width
    (plus activations): halve them below 70 GB, quarter them below 35 GB."""
    double, single = p["double"], p["single"]
    if on_gpu(ctx) and p["head_dim"] * p["heads"] >= 3072:
        if ctx.memory_bytes < 35 * 10**9:
            double, single = max(1, double // 4), max(1, single // 4)
        elif ctx.memory_bytes < 70 * 10**9:
            double, single = max(1, double // 2), max(1, single // 2)
    return {"double": double, "single": single}


def make_flux(ctx, shape: str, p) -> Workload:
    diffusers, reason = optional_import("diffusers")
    D = p["heads"] * p["head_dim"]
    guard_size(ctx, 12 * (p["double"] + p["single"]) * D * D, f"train.mmdit[{shape}]")
    depth = flux_depth(ctx, p)
    B, grid, L = p["batch"], p["grid"], p["caption"]
    size = 2 * grid  # latent side: packed 2 x 2
    dims = (f"B={B} {grid * grid} image + {L} caption tokens, D={D} H={p['heads']}, "
            f"{depth['double']} double + {depth['single']} single blocks")
    if diffusers is None:
        skip = f"diffusers: {reason}"
        peers = [Peer(n, None, skip) for n in ("fastdit", "fastdit-compile", "eager", "compile",
                                                "compile-max-autotune", "torchao-float8")]
        return Workload(group=GROUP, name="train.mmdit", shape=shape, dims=dims, peers=peers, items=float(B),
                        item_unit="img")
    from fastdit.integrations.diffusers.convert_mmdit import (flux_image_ids, flux_pack, flux_text_ids, flux_unpack,
                                                              mmdit_config_from_flux, mmdit_from_flux)
    from fastdit.models import mmdit_flops, training_flops

    config = dict(patch_size=1, in_channels=p["channels"], num_layers=depth["double"],
                  num_single_layers=depth["single"], attention_head_dim=p["head_dim"], num_attention_heads=p["heads"],
                  joint_attention_dim=p["txt_dim"], pooled_projection_dim=p["pooled"],
                  axes_dims_rope=tuple(p["axes"]), guidance_embeds=False)
    template = fresh(lambda: diffusers.FluxTransformer2DModel(**config))
    randomize_(template, private_generator(ctx))
    state = cpu_state(template)
    flops = float(training_flops(mmdit_flops(mmdit_config_from_flux(template.config), 2 * p["grid"], 2 * p["grid"],
                                             caption_len=p["caption"]))) * B
    del template
    C = p["channels"] // 4
    x = ctx.randn(B, C, size, size, dtype=torch.float32)
    context = ctx.randn(B, L, p["txt_dim"], dtype=torch.float32)
    pooled = ctx.randn(B, p["pooled"], dtype=torch.float32)
    t = torch.rand(B, generator=private_generator(ctx, 1)).to(ctx.device)
    img_ids = flux_image_ids(size, size, device=ctx.device)
    txt_ids = flux_text_ids(L, device=ctx.device)
    packed = flux_pack(x)

    def stock_model() -> nn.Module:
        model = fresh(lambda: diffusers.FluxTransformer2DModel(**config))
        model.load_state_dict(state, strict=True)
        return model.to(ctx.device).train()

    def fastdit_model() -> nn.Module:
        return mmdit_from_flux(stock_model(), backend="auto").train()

    def stock_forward(model):
        out = model(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        return flux_unpack(out, size, size)

    def fastdit_forward(model):
        return model(x, 1000 * t, context, pooled=pooled)

    reference_loss, target = reference_loss_and_target(ctx, stock_model, stock_forward)

    def regional(model: nn.Module, lists, mode):
        for attr in lists:
            for block in getattr(model, attr):
                block.compile(dynamic=False, mode=None if mode == "default" else mode)
        return model

    def peer(name, build_model, forward, lists, mode="none") -> Peer:
        def build():
            model = build_model()
            if mode != "none":
                regional(model, lists, mode)
            return training_step(model, ctx, forward, target)
        return Peer(name, build)

    ours, theirs = ("blocks", "single_blocks"), ("transformer_blocks", "single_transformer_blocks")
    peers = [peer("fastdit", fastdit_model, fastdit_forward, ours),
             peer("fastdit-compile", fastdit_model, fastdit_forward, ours, "default"),
             peer("eager", stock_model, stock_forward, theirs),
             peer("compile", stock_model, stock_forward, theirs, "default")]
    peers.append(max_autotune_peer(ctx, peer("compile-max-autotune", stock_model, stock_forward, theirs,
                                             MAX_AUTOTUNE).build))
    peers.append(_torchao_peer(ctx, stock_model, theirs,
                               lambda model, call: training_step(model, ctx, lambda m: stock_forward(call), target)))
    return Workload(group=GROUP, name="train.mmdit", shape=shape, dims=dims, peers=peers, flops=flops,
                    items=float(B), item_unit="img", reference=lambda: reference_loss,
                    check=check_first_loss(loss_tolerance(ctx)))


register(Case(group=GROUP, name="train.dit-xl2", shapes=DIT_SHAPES, quick_shapes=DIT_QUICK, make=make_dit,
              peers=("fastdit", "fastdit-compile", "eager", "compile", "compile-max-autotune", "torchao-float8")))
register(Case(group=GROUP, name="train.mmdit", shapes=FLUX_SHAPES, quick_shapes=FLUX_QUICK, make=make_flux,
              peers=("fastdit", "fastdit-compile", "eager", "compile", "compile-max-autotune", "torchao-float8")))
