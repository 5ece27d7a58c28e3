"""fastdit's modules against the same blocks written in stock PyTorch (``fastdit.bench.stock``), forward +
backward, with identical weights (random, every path live; loaded by state dict: the keys are the same).

Cases (``<case>.fwd+bwd``: forward, then ``autograd.grad`` of every input and every parameter with fixed
random cotangents; modules and inputs in ``ctx.dtype``, bf16 on a GPU):

- ``modules.attention``: ``JointAttention`` (per-stream QKV, QK-norm, RoPE on image tokens, joint attention,
  output projections) vs ``StockAttention``; shapes ``dit-xl2`` (self-attention, B=64 N=256 D=1152 16 heads,
  no QK-norm or RoPE, as DiT), ``flux`` (B=1, 4096 image + 512 caption tokens, D=3072, 24 heads, QK-norm,
  2-D RoPE), ``sd3`` (B=2, 4096 + 333, D=1536, 24 heads, QK-norm, no RoPE, as SD3.5);
- ``modules.dit-block``: ``DiTBlock`` vs ``StockDiTBlock`` at ``dit-xl2``;
- ``modules.joint-block``: ``JointDiTBlock`` vs ``StockJointBlock`` at ``flux`` and ``sd3``.

Peers: ``fastdit`` (backend ``auto`` on a GPU; on the CPU ``triton`` in Triton's interpreter),
``fastdit-compile`` (the same module through ``torch.compile``), ``eager`` / ``compile`` /
``compile-max-autotune`` (the stock module).

FLOPs (2 per multiply-add), N = image + caption tokens, D the width: projections 8·B·N·D² (attention) or
24·B·N·D² (blocks: QKV, output, MLP 4×), AdaLN 12·B·D² per stream, attention 4·B·N²·D; fwd+bwd counts
3× the matmuls and 3.5× the attention. Check: the normwise 2× rule on every output and gradient against
the stock module in float64.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from fastdit.bench.registry import Case, Peer, Workload, register
from fastdit.bench.stock import (as_tuple, check_normwise, compiled, flatten, fresh, guard_size, MAX_AUTOTUNE,
                                 max_autotune_peer, on_gpu, private_generator, randomize_, rope_rotation,
                                 StockAttention, StockDiTBlock, StockJointBlock, triton_skip)
from fastdit.modules import DiTBlock, JointAttention, JointDiTBlock
from fastdit.ops import rope_freqs_2d

GROUP = "modules"
DIRECTION = "fwd+bwd"

# (B, N_img, N_txt, D, heads, qk_norm, rope)
ATTENTION_SHAPES = {"dit-xl2": (64, 256, 0, 1152, 16, False, False), "flux": (1, 4096, 512, 3072, 24, True, True),
                    "sd3": (2, 4096, 333, 1536, 24, True, False)}
ATTENTION_QUICK = {"dit-xl2": (2, 9, 0, 144, 2, False, False), "flux": (1, 8, 3, 128, 2, True, True)}
DIT_BLOCK_SHAPES = {"dit-xl2": (64, 256, 0, 1152, 16, False, False)}
DIT_BLOCK_QUICK = {"dit-xl2": (2, 9, 0, 144, 2, False, False)}
JOINT_BLOCK_SHAPES = {"flux": (1, 4096, 512, 3072, 24, True, True), "sd3": (2, 4096, 333, 1536, 24, True, False)}
JOINT_BLOCK_QUICK = {"flux": (1, 8, 3, 128, 2, True, True)}


def dims(p) -> str:
    B, N_img, N_txt, D, H, qk_norm, rope = p
    tokens = f"N={N_img}+{N_txt}" if N_txt else f"N={N_img}"
    extras = [e for e, on in (("QK-norm", qk_norm), ("RoPE", rope)) if on]
    return f"B={B} {tokens} D={D} H={H}" + (f" ({', '.join(extras)})" if extras else "")


def module_flops(kind: str, p) -> float:
    B, N_img, N_txt, D, H, _, _ = p
    N = N_img + N_txt
    if kind == "attention":
        linear = 8.0 * B * N * D * D
    else:
        linear = 24.0 * B * N * D * D + 12.0 * B * D * D * (2 if kind == "joint-block" else 1)
    attention = 4.0 * B * N * N * D
    return 3 * linear + 3.5 * attention


def _build(kind: str, p, backend: str):
    """(fastdit module, stock module, how to call each: fn(module, x, context, c))."""
    _, N_img, N_txt, D, H, qk_norm, rope = p
    joint = N_txt > 0
    if kind == "attention":
        fast = JointAttention(D, H, joint=joint, qk_norm=qk_norm, backend=backend)
        stock = StockAttention(D, H, joint=joint, qk_norm=qk_norm)
    elif kind == "dit-block":
        fast, stock = DiTBlock(D, H, backend=backend), StockDiTBlock(D, H)
    else:
        fast, stock = JointDiTBlock(D, H, qk_norm=qk_norm, backend=backend), StockJointBlock(D, H)
    return fast, stock


def _callers(kind: str, joint: bool, freqs, rot):
    if kind == "attention":
        def call_fast(m, x, context, c):
            return m(x, context, None, freqs) if joint else m(x, img_freqs=freqs)[:1]

        def call_stock(m, x, context, c):
            return m(x, context, None, rot) if joint else m(x, None, None, rot)[:1]
    elif kind == "dit-block":
        def call_fast(m, x, context, c):
            return m(x, c)
        call_stock = call_fast
    else:
        def call_fast(m, x, context, c):
            return m(x, context, c, None, freqs, None)

        def call_stock(m, x, context, c):
            return m(x, context, c, None, rot)
    return call_fast, call_stock


def make_module(kind: str):
    def make(ctx, shape: str, p) -> Workload:
        B, N_img, N_txt, D, H, qk_norm, rope = p
        joint = N_txt > 0
        guard_size(ctx, 12 * D * D + B * (N_img + N_txt) * D, f"modules.{kind}[{shape}]")
        backend = "auto" if on_gpu(ctx) else ("reference" if triton_skip(ctx) else "triton")
        fast_template, stock_template = fresh(lambda: _build(kind, p, backend))
        randomize_(fast_template, private_generator(ctx))
        stock_template.load_state_dict(fast_template.state_dict(), strict=True)
        fast_template.to(ctx.device, ctx.dtype)
        stock_template.to(ctx.device, ctx.dtype)
        names = sorted(n for n, _ in stock_template.named_parameters())

        x = ctx.randn(B, N_img, D, requires_grad=True)
        tensors = [x]
        tensor_names = ["x"]
        context = c = None
        if joint:
            context = ctx.randn(B, N_txt, D, requires_grad=True)
            tensors.append(context)
            tensor_names.append("context")
        if kind != "attention":
            c = ctx.randn(B, D, requires_grad=True)
            tensors.append(c)
            tensor_names.append("c")
        freqs = rot = None
        if rope:
            from fastdit.bench.cases_attention import grid
            freqs = rope_freqs_2d(*grid(N_img), D // H, device=ctx.device)
            rot = rope_rotation(freqs)
        call_fast, call_stock = _callers(kind, joint, freqs, rot)
        with torch.no_grad():
            outs = as_tuple(call_stock(stock_template, x, context, c))
        cotangents = [ctx.randn(o.shape) for o in outs]

        def step(module: nn.Module, call: Callable, runner: Optional[Callable] = None) -> Callable[[], Any]:
            """Forward and backward of ``module``'s parameters and the inputs; ``runner`` (the module compiled)
            is what runs, the module itself by default."""
            params = [dict(module.named_parameters())[n] for n in names]
            inputs = tensors + params
            fn = module if runner is None else runner

            def run():
                result = as_tuple(call(fn, x, context, c))
                return result, torch.autograd.grad(result, inputs, cotangents)
            return run

        def peer(template: nn.Module, call: Callable, mode: str = "none") -> Callable[[], Callable[[], Any]]:
            def build():
                module = copy.deepcopy(template)
                if mode == "none":
                    return step(module, call)
                return step(module, call, compiled(module, None if mode == "default" else mode))
            return build

        peers = [Peer("fastdit", peer(fast_template, call_fast)),
                 Peer("fastdit-compile", peer(fast_template, call_fast, "default")),
                 Peer("eager", peer(stock_template, call_stock)),
                 Peer("compile", peer(stock_template, call_stock, "default"))]
        peers.append(max_autotune_peer(ctx, peer(stock_template, call_stock, MAX_AUTOTUNE)))
        out_names = ["x_out", "context_out"][:len(outs)]
        all_names = out_names + [f"d{n}" for n in tensor_names + names]

        def reference() -> Dict[str, Any]:
            lp = flatten(DIRECTION, step(stock_template, call_stock)())
            hi_module = copy.deepcopy(stock_template).double()
            params = [dict(hi_module.named_parameters())[n] for n in names]
            leaves = [t.detach().double().requires_grad_() for t in tensors]
            lx = leaves[0]
            lctx = leaves[1] if joint else None
            lc = leaves[-1] if kind != "attention" else None
            call = _callers(kind, joint, freqs, None if rot is None else rot.double())[1]
            result = as_tuple(call(hi_module, lx, lctx, lc))
            grads = torch.autograd.grad(result, leaves + params, [t.double() for t in cotangents])
            return {"lp": [t.detach() for t in lp], "hi": [r.detach() for r in result] + list(grads),
                    "names": all_names}

        return Workload(group=GROUP, name=f"modules.{kind}.{DIRECTION}", shape=shape, dims=dims(p), peers=peers,
                        flops=module_flops(kind, p), reference=reference,
                        check=check_normwise(lambda result: flatten(DIRECTION, result)))
    return make


for _kind, _full, _quick in (("attention", ATTENTION_SHAPES, ATTENTION_QUICK),
                             ("dit-block", DIT_BLOCK_SHAPES, DIT_BLOCK_QUICK),
                             ("joint-block", JOINT_BLOCK_SHAPES, JOINT_BLOCK_QUICK)):
    register(Case(group=GROUP, name=f"modules.{_kind}.{DIRECTION}", shapes=dict(_full), quick_shapes=dict(_quick),
                  make=make_module(_kind),
                  peers=("fastdit", "fastdit-compile", "eager", "compile", "compile-max-autotune")))

