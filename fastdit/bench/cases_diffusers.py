"""diffusers transformers with and without ``fastdit.integrations.diffusers.apply_fastdit``: one training step
per call (``benchmarks/diffusers_step.py``'s).

``diffusers.step`` at two shapes, models built from their configs with random weights (nothing is downloaded):

- ``sd3``: ``SD3Transformer2DModel`` with SD3-medium's config (24 layers, 1536 wide, 24 heads of 64), 1024 px
  (4,096 tokens) + 333 caption tokens (77 CLIP + 256 T5), batch 1;
- ``flux``: ``FluxTransformer2DModel`` at Flux's width (3072, 24 heads of 128, T5 width 4096, CLIP pooled 768)
  with 4 double + 8 single blocks (Flux.1 has 19 + 38; fewer fit a full fine-tune step with fp32 AdamW
  states in 80 GB), 1024 px (4,096 image tokens) + 512 caption tokens, batch 1.

Quick: the ``--tiny`` configs of ``diffusers_step.py``. The step: bf16 autocast forward (none on the CPU),
MSE on float32 outputs, backward, AdamW (fused on CUDA), ``set_to_none``. Peers: ``fastdit``
(``apply_fastdit(model, "auto")`` after building, then one eager forward so that ``auto`` measures its attention
paths, as ``fastdit train`` does), ``fastdit-compile`` (the same, then regional compile: each transformer block
through ``torch.compile``, as diffusers' ``compile_repeated_blocks``), ``eager`` and ``compile`` (stock,
regional). Every peer starts from the same weights; skipped with the reason when diffusers is missing.

Items = images per step. FLOPs: not counted here (see ``train.mmdit`` for a FLOP-counted Flux step).
Check: each peer's first-step loss against the float32 stock model's on a target made from that model's
output (``stock.loss_target``): 10% relative under bf16, 1e-3 in float32.
"""
from __future__ import annotations

import torch
from torch import nn

from fastdit.bench.registry import Case, Peer, Workload, register
from fastdit.bench.stock import (autocast, check_first_loss, cpu_state, fresh, guard_size, loss_tolerance,
                                 optional_import, private_generator, randomize_, reference_loss_and_target,
                                 training_step)

GROUP = "diffusers"
PEERS = ("fastdit", "fastdit-compile", "eager", "compile")

SHAPES = {
    "sd3": dict(kind="sd3", config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=192), size=128, caption=333),
    "flux": dict(kind="flux", config=dict(in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                          axes_dims_rope=(16, 56, 56)), size=64, caption=512),
}
QUICK = {
    "sd3": dict(kind="sd3", config=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16),
                size=8, caption=4),
    "flux": dict(kind="flux", config=dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                                          num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                          axes_dims_rope=(8, 28, 28)), size=4, caption=4),
}


def _width(p) -> int:
    c = p["config"]
    return c["attention_head_dim"] * c["num_attention_heads"]


def make_step_workload(ctx, shape: str, p) -> Workload:
    cfg = p["config"]
    layers = cfg["num_layers"] + cfg.get("num_single_layers", 0)
    guard_size(ctx, 12 * layers * _width(p) ** 2, f"diffusers.step[{shape}]")
    size, L = p["size"], p["caption"]
    dims = (f"B=1 {p['kind']} {layers} blocks, D={_width(p)}, "
            + (f"{size * size} image tokens" if p["kind"] == "flux" else
               f"{(size // cfg['patch_size']) ** 2} image tokens") + f" + {L} caption tokens")
    diffusers, reason = optional_import("diffusers")
    if diffusers is None:
        return Workload(group=GROUP, name="diffusers.step", shape=shape, dims=dims,
                        peers=[Peer(n, None, f"diffusers: {reason}") for n in PEERS], items=1.0, item_unit="img")
    from fastdit.integrations.diffusers import apply_fastdit

    cls = diffusers.FluxTransformer2DModel if p["kind"] == "flux" else diffusers.SD3Transformer2DModel
    template = fresh(lambda: cls(**cfg))
    randomize_(template, private_generator(ctx))
    state = cpu_state(template)
    del template

    if p["kind"] == "flux":
        from fastdit.integrations.diffusers.convert_mmdit import flux_image_ids, flux_text_ids
        C = cfg["in_channels"]
        inputs = dict(hidden_states=ctx.randn(1, size * size, C, dtype=torch.float32),
                      encoder_hidden_states=ctx.randn(1, L, cfg["joint_attention_dim"], dtype=torch.float32),
                      pooled_projections=ctx.randn(1, cfg["pooled_projection_dim"], dtype=torch.float32),
                      timestep=torch.rand(1, generator=private_generator(ctx, 1)).to(ctx.device),
                      img_ids=flux_image_ids(2 * size, 2 * size, device=ctx.device),
                      txt_ids=flux_text_ids(L, device=ctx.device))
        block_lists = ("transformer_blocks", "single_transformer_blocks")
    else:
        inputs = dict(hidden_states=ctx.randn(1, cfg["in_channels"], size, size, dtype=torch.float32),
                      encoder_hidden_states=ctx.randn(1, L, cfg["joint_attention_dim"], dtype=torch.float32),
                      pooled_projections=ctx.randn(1, cfg["pooled_projection_dim"], dtype=torch.float32),
                      timestep=(torch.rand(1, generator=private_generator(ctx, 1)) * 1000).to(ctx.device))
        block_lists = ("transformer_blocks",)

    def forward(model):
        return model(**inputs, return_dict=False)[0]

    def stock_model() -> nn.Module:
        model = fresh(lambda: cls(**cfg))
        model.load_state_dict(state, strict=True)
        return model.to(ctx.device).train()

    reference_loss, target = reference_loss_and_target(ctx, stock_model, forward)

    def peer(name: str, patched: bool, compile_: bool) -> Peer:
        def build():
            model = stock_model()
            if patched:
                apply_fastdit(model, backend="auto", warn=False)
                with torch.no_grad(), autocast(ctx):  # auto measures its attention paths at these shapes
                    forward(model)
            if compile_:
                for attr in block_lists:
                    for block in getattr(model, attr):
                        block.compile(dynamic=False)
            return training_step(model, ctx, forward, target)
        return Peer(name, build)

    peers = [peer("fastdit", True, False), peer("fastdit-compile", True, True), peer("eager", False, False),
             peer("compile", False, True)]
    return Workload(group=GROUP, name="diffusers.step", shape=shape, dims=dims, peers=peers, items=1.0,
                    item_unit="img", reference=lambda: reference_loss, check=check_first_loss(loss_tolerance(ctx)))


register(Case(group=GROUP, name="diffusers.step", shapes=SHAPES, quick_shapes=QUICK, make=make_step_workload,
              peers=PEERS))
