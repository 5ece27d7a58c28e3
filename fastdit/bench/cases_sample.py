"""Sampling: DiT-XL/2 rectified-flow sampling with classifier-free guidance, fastdit against stock PyTorch.

``sample.dit-xl2.euler`` / ``sample.dit-xl2.heun`` (shape ``dit-xl2``): 32 images of 256 px (latents 4×32×32)
per call, 50 Euler steps (50 model calls) or 50 Heun steps (100 calls), CFG scale 4 as one batched call of
2 × 32 per model evaluation, bf16 autocast, state in float32, the same initial noise every call.
DiT-XL/2 with learned sigma and the null class (the official checkpoint layout), random weights (every
path live), identical for every peer.

Peers: ``fastdit`` (``fastdit.diffusion.sample`` on ``fastdit.models.DiT``, backend auto), ``fastdit-compile``
(the same with the model through ``torch.compile``), ``fastdit-compiled-step`` (``sample(...,
compile=True)``: the guided step as one graph, CUDA graphs on a GPU), ``eager`` / ``compile`` /
``compile-reduce-overhead`` / ``compile-max-autotune`` (``stock.stock_flow_sample``, a plain loop, on
``stock.StockDiT``). Quick: 2 steps of a one-block DiT.

Items = images per call. FLOPs = model calls × 2B × ``DiT.flops_per_sample()`` (forward). Check: the
samples against the float32 stock sampler from the same noise, ‖Δ‖/‖ref‖ ≤ 5% under bf16 (1e-4 in fp32).
"""
from __future__ import annotations

import torch

from fastdit.bench.registry import Case, Peer, Workload, register
from fastdit.bench.stock import (autocast, check_samples, compiled, cpu_state, fresh, guard_size, MAX_AUTOTUNE,
                                 max_autotune_peer, private_generator, randomize_, stock_flow_sample, StockDiT)

GROUP = "sample"
CFG_SCALE = 4.0

SHAPES = {"dit-xl2": dict(depth=28, hidden=1152, heads=16, latent=32, batch=32, steps=50)}
QUICK = {"dit-xl2": dict(depth=1, hidden=128, heads=2, latent=8, batch=2, steps=2)}


def make_sampler(sampler: str):
    def make(ctx, shape: str, p) -> Workload:
        from fastdit.diffusion import sample
        from fastdit.models import DiT

        B, steps, latent = p["batch"], p["steps"], p["latent"]
        guard_size(ctx, 12 * p["depth"] * p["hidden"] ** 2 + B * latent ** 2 * p["hidden"], f"sample[{shape}]")
        cfg = dict(depth=p["depth"], hidden_size=p["hidden"], num_heads=p["heads"], input_size=latent,
                   learn_sigma=True, class_dropout_prob=0.1)
        template = fresh(lambda: DiT.from_name("DiT-XL/2", backend="auto", **cfg))
        randomize_(template, private_generator(ctx))
        state = cpu_state(template)
        calls = steps * (2 if sampler == "heun" else 1)
        flops = float(calls * 2 * B * template.flops_per_sample())
        del template
        noise = ctx.randn(B, 4, latent, latent, dtype=torch.float32)
        y = torch.randint(0, 1000, (B,), generator=private_generator(ctx, 1)).to(ctx.device)
        null = torch.full((B,), 1000, dtype=torch.long, device=ctx.device)

        def stock_model():
            model = fresh(lambda: StockDiT(p["depth"], p["hidden"], p["heads"], latent=latent, learn_sigma=True,
                                           null_class=True))
            model.load_state_dict(state, strict=True)
            return model.to(ctx.device).eval()

        def fastdit_model():
            model = fresh(lambda: DiT.from_name("DiT-XL/2", backend="auto", **cfg))
            model.load_state_dict(state, strict=True)
            return model.to(ctx.device).eval()

        def ours(mode: str = "none"):
            def build():
                model = fastdit_model()
                call = compiled(model) if mode == "model" else model

                def run():
                    with autocast(ctx):
                        return sample(call, noise.shape, cond={"y": y}, uncond={"y": null}, cfg_scale=CFG_SCALE,
                                      sampler=sampler, steps=steps, noise=noise, device=ctx.device, progress=False,
                                      compile=mode == "step")
                return run
            return build

        def theirs(mode: str = "none"):
            def build():
                model = stock_model()
                call = model if mode == "none" else compiled(model, None if mode == "default" else mode)

                def run():
                    with autocast(ctx):
                        return stock_flow_sample(call, noise, y, null, CFG_SCALE, steps, sampler)
                return run
            return build

        peers = [Peer("fastdit", ours()), Peer("fastdit-compile", ours("model")),
                 Peer("fastdit-compiled-step", ours("step")), Peer("eager", theirs()),
                 Peer("compile", theirs("default"))]
        if ctx.device.type == "cuda":  # CUDA graphs
            peers.append(Peer("compile-reduce-overhead", theirs("reduce-overhead")))
        peers.append(max_autotune_peer(ctx, theirs(MAX_AUTOTUNE)))

        def reference():
            return stock_flow_sample(stock_model(), noise, y, null, CFG_SCALE, steps, sampler)

        tolerance = 5e-2 if ctx.dtype in (torch.bfloat16, torch.float16) else 1e-4
        return Workload(group=GROUP, name=f"sample.dit-xl2.{sampler}", shape=shape,
                        dims=f"B={B} latent 4x{latent}x{latent} {sampler} {steps} steps ({calls} calls) CFG {CFG_SCALE:g} "
                             f"depth={p['depth']} D={p['hidden']}",
                        peers=peers, flops=flops, items=float(B), item_unit="img", reference=reference,
                        check=check_samples(tolerance))
    return make


for _sampler in ("euler", "heun"):
    register(Case(group=GROUP, name=f"sample.dit-xl2.{_sampler}", shapes=dict(SHAPES), quick_shapes=dict(QUICK),
                  make=make_sampler(_sampler), peers=("fastdit", "fastdit-compile", "fastdit-compiled-step", "eager",
                                                      "compile", "compile-reduce-overhead", "compile-max-autotune")))
