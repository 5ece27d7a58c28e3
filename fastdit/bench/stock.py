"""Stock-PyTorch peers of ``fastdit bench``, and the helpers its cases share.

Stock models (what a user writes without fastdit: ``F.layer_norm`` + modulate, ``F.rms_norm``, Flux's
``apply_rope``, ``torch.cat`` + SDPA, ``nn.Linear``) with fastdit's state-dict keys, so that one set of
weights loads into either and the checks compare outputs:

- :class:`StockAttention`: fastdit's ``JointAttention`` keys (``qkv``, ``proj``, ``q_norm.weight``, ...,
  ``txt_qkv``, ``txt_proj``, ``txt_q_norm.weight``, ...);
- :class:`StockDiTBlock` / :class:`StockJointBlock`: ``DiTBlock`` / ``JointDiTBlock`` keys;
- :class:`StockDiT`: the official DiT layout (``x_embedder.proj``, ``pos_embed``, ``t_embedder.mlp``,
  ``y_embedder.embedding_table``, ``blocks.{i}``, ``final_layer``), i.e. fastdit's ``DiT``;
- :func:`stock_flow_sample`: the Euler / Heun rectified-flow sampler with batched classifier-free guidance,
  written as a plain loop.

Helpers: directions (fwd / bwd / fwd+bwd) with fixed cotangents, float64 references, the checks (fastdit's
2×-the-low-precision-reference rule elementwise, a normwise form of it, a first-step loss check), weight
randomisation from a private generator, skip reasons for peers that cannot run here.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.testing import FLOORS, compare_to_reference, group_scale

EPS = 1e-6
# Full-size workloads never run on the CPU: a workload over this many elements there is refused.
CPU_ELEMENT_LIMIT = 1 << 20
CPU_MAX_AUTOTUNE_SKIP = ("max-autotune tunes GPU Triton/GEMM templates; on the CPU it only adds minutes of "
                         "compile time to the plain compile peer")
CPU_GPU_ONLY = "runs on CUDA only"


# --------------------------------------------------------------------------------------- context helpers

def on_gpu(ctx) -> bool:
    return ctx.device.type == "cuda"


MAX_AUTOTUNE = "max-autotune-no-cudagraphs"


def max_autotune_peer(ctx, build: Callable[[], Callable[[], Any]]):
    """The ``compile-max-autotune`` peer: ``build`` (a peer build; it compiles with :data:`MAX_AUTOTUNE`) on a
    GPU, and on the CPU a skip saying why."""
    from fastdit.bench.registry import Peer

    if on_gpu(ctx):
        return Peer("compile-max-autotune", build)
    return Peer("compile-max-autotune", None, CPU_MAX_AUTOTUNE_SKIP)


def triton_skip(ctx) -> Optional[str]:
    """Why fastdit's Triton kernels cannot run on ``ctx.device`` (None when they can): on the CPU they run
    only under Triton's interpreter (``TRITON_INTERPRET=1`` before fastdit is imported)."""
    if on_gpu(ctx):
        return None
    from fastdit.ops._common import triton_interpreter_on

    if triton_interpreter_on():
        return None
    return ("Triton kernels run on CUDA; on the CPU only under Triton's interpreter, and TRITON_INTERPRET=1 "
            "was not set before fastdit was imported")


def guard_size(ctx, elements: float, what: str) -> None:
    """Refuse to build a full-size workload on the CPU (more than :data:`CPU_ELEMENT_LIMIT` elements)."""
    if not on_gpu(ctx) and elements > CPU_ELEMENT_LIMIT:
        raise ValueError(f"{what}: {elements:.3g} elements is a GPU shape; the CPU runs the quick shapes only")


def autocast(ctx):
    """bf16/fp16 autocast on the device when ``ctx.dtype`` is low precision, else nothing (fp32 on the CPU)."""
    if ctx.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(ctx.device.type, dtype=ctx.dtype)
    return contextlib.nullcontext()


def compiled(fn, mode: Optional[str] = None):
    """``torch.compile`` specialised to the shapes (``dynamic=False``), compiled lazily on first call."""
    return torch.compile(fn, dynamic=False, mode=mode)


def private_generator(ctx, offset: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``ctx.seed`` (weights are made on the CPU, then moved)."""
    generator = torch.Generator()
    generator.manual_seed(ctx.seed * 1000003 + 7919 + offset)
    return generator


def fresh(builder: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without disturbing the global RNG (its own init draws from it; every weight is
    then overwritten by :func:`randomize_` from a private generator)."""
    with torch.random.fork_rng(devices=[]):
        return builder()


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator, gain: float = 0.5) -> nn.Module:
    """Overwrite every parameter with random values from ``generator``: matrices and convolutions
    ``N(0, gain² / fan_in)``, norm weights ``1 + N(0, 0.1²)``, biases and the rest ``N(0, 0.02²)``. Unlike
    DiT's zero-initialised AdaLN and output layers, every path then contributes, so a wrong one shows."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            value = torch.randn(p.shape, generator=generator) * (gain / math.sqrt(fan_in))
        elif "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * torch.randn(p.shape, generator=generator)
        else:
            value = 0.02 * torch.randn(p.shape, generator=generator)
        p.copy_(value.to(p.dtype))
    return module


def cpu_state(module: nn.Module) -> Dict[str, Tensor]:
    """A detached CPU copy of a state dict (kept by a workload while its peers build their own models)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def tensor_bytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optional_import(module: str) -> Tuple[Any, Optional[str]]:
    """(the module, None) or (None, "<module> not installed" / the import error)."""
    import importlib

    try:
        return importlib.import_module(module), None
    except ImportError as err:
        if getattr(err, "name", None) == module.split(".")[0]:
            return None, f"{module.split('.')[0]} not installed"
        return None, f"{module} fails to import: {type(err).__name__}: {err}"
    except Exception as err:  # a broken build failing at import
        return None, f"{module} fails to import: {type(err).__name__}: {err}"


def short_error(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------ directions

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


def as_tuple(out) -> Tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    return tuple(o for o in out if o is not None)


def direction_call(direction: str, forward: Callable, inputs: Sequence[Tensor],
                   cotangents: "Sequence[Tensor] | Callable[[Tuple[Tensor, ...]], Sequence[Tensor]]",
                   extra_args: Sequence[Any] = ()) -> Callable[[], Any]:
    """The callable to time for one direction (also what ``benchmarks/harness.py``'s ``direction_builder``
    builds for the pytest GPU suite):

    - ``fwd``: ``forward(*inputs, *extra_args)`` under ``no_grad``; returns the outputs;
    - ``fwd+bwd``: forward, then ``autograd.grad`` of the outputs w.r.t. ``inputs`` with the fixed
      ``cotangents`` (one per output, made before timing); returns ``(outputs, grads)``;
    - ``bwd``: the forward runs once, here (untimed); each call is ``autograd.grad`` over the retained
      graph; returns the grads.

    ``extra_args`` follow the inputs in each forward call and are not differentiated. ``cotangents`` may
    instead be a function of the outputs that returns them (for callers that do not know the outputs'
    shapes in advance; it should return the same, cached tensors each time): ``fwd+bwd`` calls it after
    each forward, ``bwd`` once, after its forward.
    """
    inputs = list(inputs)
    extra_args = tuple(extra_args)
    if direction == "fwd":
        def run():
            with torch.no_grad():
                return as_tuple(forward(*inputs, *extra_args))
        return run
    if direction == "fwd+bwd":
        if callable(cotangents):
            def run():
                outs = as_tuple(forward(*inputs, *extra_args))
                return outs, torch.autograd.grad(outs, inputs, list(cotangents(outs)))
            return run

        def run():
            outs = as_tuple(forward(*inputs, *extra_args))
            return outs, torch.autograd.grad(outs, inputs, list(cotangents))
        return run
    if direction != "bwd":
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    outs = as_tuple(forward(*inputs, *extra_args))
    if callable(cotangents):
        cotangents = cotangents(outs)

    def run():
        return torch.autograd.grad(outs, inputs, list(cotangents), retain_graph=True)
    return run


def flatten(direction: str, result) -> List[Tensor]:
    """A peer's result as the list the reference holds: outputs (fwd), grads (bwd), outputs + grads."""
    if direction == "fwd+bwd":
        outs, grads = result
        return list(outs) + list(grads)
    return list(result)


def leaf_copies(inputs: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> List[Tensor]:
    """Detached copies (optionally cast) that require grad: the inputs of a reference computation."""
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in inputs]


def reference_results(direction: str, ref_fn: Callable, inputs: Sequence[Tensor], cotangents: Sequence[Tensor],
                      names: Sequence[str], ref64_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """The reference of one direction: ``lp`` (``ref_fn`` on the inputs, in their dtypes) and ``hi`` (on
    float64 copies), each as the list a peer's flattened result has, with its names and where the
    gradients start. ``ref64_fn`` replaces ``ref_fn`` for the float64 run (a chunked one, say)."""
    def run(fn, xs, cots):
        outs = as_tuple(fn(*xs))
        grads = torch.autograd.grad(outs, xs, cots) if direction != "fwd" else ()
        outs = [o.detach() for o in outs]
        grads = [g.detach() for g in grads]
        return outs, grads

    lp_outs, lp_grads = run(ref_fn, leaf_copies(inputs), list(cotangents))
    hi_outs, hi_grads = run(ref64_fn or ref_fn, leaf_copies(inputs, torch.float64),
                            [c.double() for c in cotangents])
    n_out = len(lp_outs)
    out_names = list(names[:n_out])
    grad_names = [f"d{n}" for n in names[n_out:]]
    if direction == "fwd":
        return {"lp": lp_outs, "hi": hi_outs, "names": out_names, "grads_from": n_out}
    if direction == "bwd":
        return {"lp": lp_grads, "hi": hi_grads, "names": grad_names, "grads_from": 0}
    return {"lp": lp_outs + lp_grads, "hi": hi_outs + hi_grads, "names": out_names + grad_names,
            "grads_from": n_out}


def _count(got: List[Tensor], reference: Dict[str, Any]) -> Optional[str]:
    if len(got) != len(reference["hi"]):
        return f"the result holds {len(got)} tensors, the reference {len(reference['hi'])}"
    return None


def check_2x(direction: str) -> Callable[[Any, Any], Tuple[bool, str]]:
    """fastdit.testing's rule, elementwise, for every output and gradient: max|result − float64| at most
    2 × that of the reference computed in the inputs' dtype, plus the dtype's floor (gradients' floors
    scaled by the largest gradient of the call, as the kernel tests do)."""
    def check(result, reference) -> Tuple[bool, str]:
        got = flatten(direction, result)
        problem = _count(got, reference)
        if problem:
            return False, problem
        start = reference["grads_from"]
        scale = group_scale(reference["hi"][start:]) if start < len(got) else None
        worst, worst_ratio, failed = None, -1.0, []
        for i, (g, lp, hi, name) in enumerate(zip(got, reference["lp"], reference["hi"], reference["names"])):
            try:
                c = compare_to_reference(g, lp, hi, name=name, scale=scale if i >= start else None)
            except AssertionError as err:
                return False, str(err)
            ratio = c.error / max(c.allowed, 1e-300)
            if not c.ok:
                failed.append(name)
            if ratio > worst_ratio:
                worst, worst_ratio = c, ratio
        detail = (f"worst {worst.name}: max err {worst.error:.2e} vs allowed {worst.allowed:.2e} "
                  f"(2x the same-dtype reference's {worst.reference_error:.2e} + floor)")
        return (not failed), (f"FAILED {', '.join(failed)}; " if failed else "") + detail
    return check


def relative_error(got: Tensor, want: Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    g, w = got.detach().double(), want.detach().double()
    return float((g - w).norm() / w.norm().clamp_min(1e-300))


def check_normwise(flatten_fn: Callable[[Any], List[Tensor]], factor: float = 2.0
                   ) -> Callable[[Any, Any], Tuple[bool, str]]:
    """The 2× rule in norms, for results made of many reductions over large tensors (attention, whole
    modules), where a max over 10⁸ elements would make the verdict a matter of luck: for every tensor,
    ‖result − float64‖/‖float64‖ ≤ 2 × that of the same-dtype reference + the dtype's floor. Non-finite
    values fail."""
    def check(result, reference) -> Tuple[bool, str]:
        got = flatten_fn(result)
        problem = _count(got, reference)
        if problem:
            return False, problem
        worst, failed = ("", 0.0, 0.0), []
        for g, lp, hi, name in zip(got, reference["lp"], reference["hi"], reference["names"]):
            if tuple(g.shape) != tuple(hi.shape):
                return False, f"{name}: shape {tuple(g.shape)}, expected {tuple(hi.shape)}"
            if not torch.isfinite(g).all():
                return False, f"{name}: non-finite values"
            err = relative_error(g, hi)
            allowed = factor * relative_error(lp, hi) + FLOORS.get(lp.dtype, 1e-6)
            if err > allowed:
                failed.append(name)
            if err / allowed > worst[1] / max(worst[2], 1e-300) or not worst[0]:
                worst = (name, err, allowed)
        detail = f"worst {worst[0]}: rel err {worst[1]:.2e} vs allowed {worst[2]:.2e} (2x the same-dtype reference's + floor)"
        return (not failed), (f"FAILED {', '.join(failed)}; " if failed else "") + detail
    return check


def loss_tolerance(ctx) -> float:
    """Relative tolerance of a first-step loss against the float32 reference (see :func:`loss_target`):
    10% under bf16 autocast (float8 GEMMs included), 1e-3 in float32."""
    return 0.1 if ctx.dtype in (torch.bfloat16, torch.float16) else 1e-3


def loss_target(reference_out: Tensor, generator: torch.Generator, noise_ratio: float = 0.5) -> Tensor:
    """A regression target that makes the first-step loss discriminating: the float32 reference output
    plus noise of ``noise_ratio`` × its RMS. The reference loss is then ≈ noise_ratio² · mean(out²);
    a result deviating by δ adds ≈ mean(δ²): bf16 rounding moves the loss by < 1%, a wrong output by
    hundreds of percent (a target independent of the output would hide it)."""
    rms = reference_out.float().square().mean().sqrt()
    noise = torch.randn(reference_out.shape, generator=generator, dtype=torch.float32).to(reference_out.device)
    return (reference_out.float() + noise_ratio * rms * noise).detach()


def reference_loss_and_target(ctx, stock_model: Callable[[], nn.Module],
                               forward: Callable[[nn.Module], Tensor]) -> Tuple[float, Tensor]:
    """The float32 stock model's output on the workload's inputs (``forward(stock_model())``, no gradients),
    turned into the training target (:func:`loss_target`) and the loss the peers' first step is checked
    against; the reference model is freed before the peers are built."""
    model = stock_model()
    with torch.no_grad():
        out = forward(model).float()
    del model
    target = loss_target(out, private_generator(ctx, 3))
    return float(F.mse_loss(out, target)), target


def check_first_loss(tolerance: float) -> Callable[[Any, Any], Tuple[bool, str]]:
    """Result ``{"first_loss": tensor, ...}`` (the loss of the peer's first step, from the shared weights),
    reference the float32 stock loss: finite, and within ``tolerance`` relative."""
    def check(result, reference) -> Tuple[bool, str]:
        loss = float(result["first_loss"])
        want = float(reference)
        if not math.isfinite(loss):
            return False, f"first-step loss {loss} is not finite"
        rel = abs(loss - want) / max(abs(want), 1e-30)
        return rel <= tolerance, (f"first-step loss {loss:.6g} vs float32 reference {want:.6g}: rel diff {rel:.2e} "
                                  f"(tolerance {tolerance:g})")
    return check


def check_samples(tolerance: float) -> Callable[[Any, Any], Tuple[bool, str]]:
    """Samples against the float32 stock sampler from the same noise: finite, ‖Δ‖/‖ref‖ ≤ tolerance."""
    def check(result, reference) -> Tuple[bool, str]:
        if tuple(result.shape) != tuple(reference.shape):
            return False, f"samples have shape {tuple(result.shape)}, expected {tuple(reference.shape)}"
        if not torch.isfinite(result).all():
            return False, "samples hold non-finite values"
        rel = relative_error(result, reference)
        return rel <= tolerance, f"samples rel err {rel:.2e} vs float32 stock sampler (tolerance {tolerance:g})"
    return check


def training_step(model: nn.Module, ctx, forward: Callable[[nn.Module], Tensor], target: Tensor,
                  params: Optional[List[nn.Parameter]] = None) -> Callable[[], Dict[str, Tensor]]:
    """One training step per call, as the baselines run it: forward under bf16 autocast (none in fp32),
    MSE on float32 outputs, backward, AdamW (fused on CUDA, foreach on the CPU), ``set_to_none``.
    Returns ``{"loss": this step's loss, "first_loss": the first call's}`` (tensors: no sync)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    fused = {"fused": True} if on_gpu(ctx) else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=1e-4, **fused)
    first: List[Tensor] = []

    def step():
        with autocast(ctx):
            out = forward(model)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        if not first:
            first.append(loss)
        return {"loss": loss, "first_loss": first[0]}
    return step


# ------------------------------------------------------------------------------- stock functional pieces

def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = EPS) -> Tensor:
    """DiT's ``modulate(norm(x), shift, scale)``: ``F.layer_norm`` without affine, then per-sample modulation."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def rope_rotation(freqs: Tensor) -> Tensor:
    """Flux's ``EmbedND`` output from a (N, d/2, 2) [cos, sin] table: (N, d/2, 2, 2) rotation matrices
    (made once per model forward, outside the timed blocks)."""
    cos, sin = freqs.unbind(-1)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Flux's ``apply_rope`` on (B, H, N, d): interleaved channel pairs, float32 math (float64 for float64)."""
    x_ = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(*x.shape[:-1], -1, 1, 2)
    return (rot[..., 0] * x_[..., 0] + rot[..., 1] * x_[..., 1]).reshape(x.shape).type_as(x)


# ----------------------------------------------------------------------------------------- stock modules

class StockMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class StockAttention(nn.Module):
    """MMDiT / DiT attention in stock PyTorch, with fastdit ``JointAttention``'s keys: per-stream fused QKV
    Linear, optional ``F.rms_norm`` of q and k per head, Flux's RoPE on the image tokens, ``torch.cat``
    [text, image], SDPA, split, per-stream output Linear. ``forward(x, context=None, attn_mask=None,
    rot=None) -> (x_out, context_out or None)``."""

    def __init__(self, dim: int, heads: int, *, joint: bool = False, qk_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.qk_norm = heads, dim // heads, qk_norm
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        if qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=EPS), nn.RMSNorm(self.head_dim, eps=EPS)
        if joint:
            self.txt_qkv, self.txt_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            if qk_norm:
                self.txt_q_norm = nn.RMSNorm(self.head_dim, eps=EPS)
                self.txt_k_norm = nn.RMSNorm(self.head_dim, eps=EPS)

    def _qkv(self, x, qkv, q_norm, k_norm, rot):
        B, N, _ = x.shape
        q, k, v = qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if rot is not None:
            q, k = apply_rope(q, rot), apply_rope(k, rot)
        return q, k, v

    def forward(self, x, context=None, attn_mask=None, rot=None):
        B, N, D = x.shape
        q, k, v = self._qkv(x, self.qkv, getattr(self, "q_norm", None), getattr(self, "k_norm", None), rot)
        if context is None:
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
            return self.proj(out), None
        qt, kt, vt = self._qkv(context, self.txt_qkv, getattr(self, "txt_q_norm", None),
                               getattr(self, "txt_k_norm", None), None)
        q, k, v = (torch.cat([t, i], dim=2) for t, i in ((qt, q), (kt, k), (vt, v)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, -1, D)
        L = context.shape[1]
        return self.proj(out[:, L:]), self.txt_proj(out[:, :L])


class _AdaLN(nn.Sequential):
    """``SiLU -> Linear(dim, n * dim)`` (keys ``1.weight``, ``1.bias``), chunked."""

    def __init__(self, dim: int, n: int):
        super().__init__(nn.SiLU(), nn.Linear(dim, n * dim))
        self.n = n

    def forward(self, c):
        return super().forward(c).chunk(self.n, -1)


class StockDiTBlock(nn.Module):
    """DiT's AdaLN-Zero block in stock PyTorch (official keys = fastdit ``DiTBlock``'s)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = StockAttention(dim, heads)
        self.mlp = StockMlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = _AdaLN(dim, 6)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)
        x = x + gate1[:, None] * self.attn(modulate(x, shift1, scale1))[0]
        return x + gate2[:, None] * self.mlp(modulate(x, shift2, scale2))


class StockJointBlock(nn.Module):
    """SD3/Flux double-stream block in stock PyTorch with fastdit ``JointDiTBlock``'s keys: per-stream
    modulation, norms and MLPs, QK RMSNorm, RoPE on the image tokens, one SDPA over [caption, image].
    ``forward(x, context, c, attn_mask=None, rot=None) -> (x, context)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attn = StockAttention(dim, heads, joint=True, qk_norm=True)
        self.mlp, self.txt_mlp = StockMlp(dim, hidden), StockMlp(dim, hidden)
        self.adaLN_modulation, self.txt_adaLN_modulation = _AdaLN(dim, 6), _AdaLN(dim, 6)

    def forward(self, x, context, c, attn_mask=None, rot=None):
        i = self.adaLN_modulation(c)
        t = self.txt_adaLN_modulation(c)
        ax, ac = self.attn(modulate(x, i[0], i[1]), modulate(context, t[0], t[1]), attn_mask, rot)
        x = x + i[2][:, None] * ax
        context = context + t[2][:, None] * ac
        x = x + i[5][:, None] * self.mlp(modulate(x, i[3], i[4]))
        context = context + t[5][:, None] * self.txt_mlp(modulate(context, t[3], t[4]))
        return x, context


def sincos_table(dim: int, grid: int) -> Tensor:
    """DiT's fixed 2-D sin-cos position table (grid², dim): first half encodes the column, second the row."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos.double()[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], 1)
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    return torch.cat([one(dim // 2, cols), one(dim // 2, rows)], 1).float()


class _Holder(nn.Module):
    """A named container (for the official key layout)."""


class StockDiT(nn.Module):
    """Class-conditional DiT in stock PyTorch with the official (= fastdit ``DiT``'s) keys; defaults are
    DiT-XL/2 on 4×32×32 latents. ``forward(x, t, y) -> (B, out_channels, H, W)``; ``learn_sigma`` doubles
    the output channels; ``null_class`` adds the CFG null label row."""

    def __init__(self, depth=28, dim=1152, heads=16, patch=2, in_channels=4, latent=32, num_classes=1000,
                 learn_sigma=False, null_class=False):
        super().__init__()
        self.patch, self.out_channels, self.grid = patch, in_channels * (2 if learn_sigma else 1), latent // patch
        self.x_embedder = _Holder()
        self.x_embedder.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.register_buffer("pos_embed", sincos_table(dim, self.grid)[None])
        self.t_embedder = _Holder()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = _Holder()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + int(null_class), dim)
        self.blocks = nn.ModuleList(StockDiTBlock(dim, heads) for _ in range(depth))
        self.final_layer = _Holder()
        self.final_layer.adaLN_modulation = _AdaLN(dim, 2)
        self.final_layer.linear = nn.Linear(dim, patch * patch * self.out_channels)

    def forward(self, x, t, y):
        B = x.shape[0]
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
        angles = t.float()[:, None] * freqs[None]
        t_emb = torch.cat([torch.cos(angles), torch.sin(angles)], -1)
        c = self.t_embedder.mlp(t_emb.to(self.t_embedder.mlp[0].weight.dtype)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_layer.adaLN_modulation(c)
        out = self.final_layer.linear(modulate(tokens, shift, scale))
        g, p, C = self.grid, self.patch, self.out_channels
        return out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)


@torch.no_grad()
def stock_flow_sample(model: Callable, noise: Tensor, y: Tensor, null: Tensor, cfg_scale: float, steps: int,
                      sampler: str = "euler", time_scale: float = 1000.0) -> Tensor:
    """Rectified-flow sampling from t = 1 (noise) to 0 as a plain loop: uniform steps, the model sees
    ``t · time_scale``, classifier-free guidance as one batched call on [cond, uncond]
    (``uncond + s · (cond − uncond)``), the first C output channels are the velocity; ``"heun"`` averages
    the velocities at both ends of each step. State in float32."""
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise.float().clone()
    B, C = x.shape[:2]
    labels = torch.cat([y, null])

    def velocity(z, t):
        out = model(torch.cat([z, z]), torch.full((2 * B,), t * time_scale, device=z.device), labels)
        cond, uncond = out[:, :C].float().chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    for i in range(steps):
        dt = ts[i + 1] - ts[i]
        v = velocity(x, ts[i])
        if sampler == "heun":
            v = 0.5 * (v + velocity(x + dt * v, ts[i + 1]))
        x = x + dt * v
    return x
