"""Helpers shared by the ops: input checks with readable errors, compute dtypes, backend choice."""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional, Tuple, Union

import torch

from fastdit.backend import resolve_backend

# Dtypes the Triton kernels are written for. Everything else (float64, integer…) runs on the reference.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def fail(op: str, message: str) -> None:
    raise ValueError(f"fastdit.ops.{op}: {message}")


def check(condition: bool, op: str, message: Union[str, Callable[[], str]]) -> None:
    """Raise ``ValueError("fastdit.ops.<op>: <message>")`` unless ``condition``. A message that formats
    shapes should be a ``lambda``: it is only built on failure, so torch.compile never traces the
    formatting (``str`` of a symbolic size is a graph break, fatal under ``fullgraph=True``)."""
    if not condition:
        fail(op, message() if callable(message) else message)


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_floating(op: str, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        check(isinstance(t, torch.Tensor), op, lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check(t.is_floating_point(), op, lambda: f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        fail(op, f"all tensors must be on one device, got {listing}")


def check_linear_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """A Linear layer's inputs: floating point, one device, weight (out, in), x (..., in), bias (out,) or None."""
    check_floating(op, x=x, weight=weight, bias=bias)
    check_same_device(op, x=x, weight=weight, bias=bias)
    check(weight.dim() == 2, op, lambda: f"weight must be 2-D (out, in), got {shape_str(weight)}")
    check(x.dim() >= 1 and x.shape[-1] == weight.shape[1], op,
          lambda: f"x's last dimension must be weight's in = {weight.shape[1]}, got x {shape_str(x)}")
    check(bias is None or tuple(bias.shape) == (weight.shape[0],), op,
          lambda: f"bias must be (out,) = ({weight.shape[0]},), got {shape_str(bias)}")


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float32, or float64 when an input is float64: references compute in at least float32."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why a Triton kernel cannot run on these tensors' device, or None."""
    if not _HAS_TRITON:
        return "triton is not installed"
    device = next(t.device for t in tensors if t is not None)
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on()):
        return None
    return f"tensors are on {device}; Triton kernels run on CUDA (or on CPU with TRITON_INTERPRET=1)"


def kernel_can_run(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a library op's implementation launches its Triton kernel for these tensors (CUDA, or CPU
    under the interpreter; float16/bfloat16/float32). Otherwise it computes with the reference math
    (float64 gradcheck, say). The interpreter must be on before the kernels are imported."""
    return triton_device_reason(*tensors) is None and all(
        t.dtype in TRITON_DTYPES for t in tensors if t is not None)


def triton_dtype_reason(**tensors: Optional[torch.Tensor]) -> Optional[str]:
    bad = [f"{name} has dtype {t.dtype}" for name, t in tensors.items()
           if t is not None and t.dtype not in TRITON_DTYPES]
    if bad:
        return ", ".join(bad) + "; the Triton kernels take float16, bfloat16 and float32"
    return None


def join_reasons(*reasons: Optional[str]) -> Optional[str]:
    """All the reasons a kernel cannot run, or None."""
    present = [r for r in reasons if r]
    return "; ".join(present) if present else None


# Under torch.compile, "auto" launches an elementwise library op only where that measured faster than letting
# Inductor fuse the reference math: in training (gradients needed), for ops of at least 2^24 elements. Measured
# on an H100 (torch 2.11): DiT-XL/2 bs128 training, 37.7 M elements per op, kernels 545.6 img/s against 530.8 on
# the reference path (whole-model compile); 8 Flux double blocks bs1 (12.6 M per op), per-block compile,
# kernels 103.6-109.9 ms against 100.5-101.0 (benchmarks/results/2026-11-22_h100_train_step/); SD3-medium bs1
# training through diffusers, compiled (6.8 M), kernels 0.79x stock (host time of the opaque ops,
# benchmarks/results/2026-12-07_h100_diffusers_step/); DiT-XL/2 inference forward bs64, compiled, kernels
# 37.5 ms against stock 34.5 (Inductor fuses each block's trailing residual into the next norm across the
# block boundary; issue 15). Three sizes are few: the bound lies somewhere between 12.6 M and 37.7 M.
COMPILED_MIN_ELEMENTS = 1 << 24


def compiled_kernel_pays(elements: int, grad: bool) -> bool:
    """Whether "auto" takes a library op inside a torch.compile graph (see COMPILED_MIN_ELEMENTS)."""
    return grad and elements >= COMPILED_MIN_ELEMENTS


def use_triton(op: str, backend: Optional[str], unsupported_reason: Callable[[], Optional[str]],
               kernel_ready: bool, compiled_work: Optional[Callable[[], Tuple[int, bool]]] = None) -> bool:
    """Decide between the fast path (Triton) and the reference for one call.

    The fast path is the ``torch.library`` op under torch.compile (what the compiler traces, opaque)
    and, in eager mode, an ``autograd.Function`` around the same implementation (the library op's
    Python-level autograd costs tens of microseconds per call on the host); both compute the same bits.

    ``unsupported_reason`` returns why the Triton kernel cannot take these inputs (or None);
    ``kernel_ready`` says whether a Triton kernel exists for the op on this device. Under ``"auto"``
    the library op is used only when both allow it; ``"triton"`` raises on unsupported inputs.
    ``compiled_work`` returns (elements, gradients needed) of the call: while torch.compile traces, ``"auto"``
    takes the library op only where :func:`compiled_kernel_pays` (``"triton"`` always takes it).
    """
    chosen = resolve_backend(backend)
    if chosen == "reference":
        return False
    reason = unsupported_reason()
    if chosen == "triton":
        if reason is not None:
            fail(op, f"backend='triton' cannot run these inputs: {reason}")
        return True
    if compiled_work is not None and kernel_ready and torch.compiler.is_compiling() \
            and not compiled_kernel_pays(*compiled_work()):
        return False
    return kernel_ready and reason is None


# Opt-in, read once at import (ops are registered then): FASTDIT_TRITON_OP=1.
TRITON_OP_ENV = "FASTDIT_TRITON_OP"
_TRITON_OP_REQUESTED = os.environ.get(TRITON_OP_ENV, "0") == "1"


def traceable_kernels() -> bool:
    """Whether fastdit's library ops are ``torch.library.triton_op``s that torch.compile traces into: Inductor
    then launches the kernels from its generated code. Opt-in with ``FASTDIT_TRITON_OP=1`` (compiled Triton
    only; under the CPU interpreter a kernel cannot be traced). Not the default because of what was measured
    on an H100 (torch 2.11, Triton 3.6, 2026-12-07): each op compiles correctly and its compiled code calls
    the kernels (tested), but ``torch.compile`` of a whole DiT-XL/2 training step did not finish within 150 s
    (at batch 16; the stock model's compile and timed steps at batch 128 fit in the same run's budget), so the
    runtime gain could not be measured (benchmarks/results/2026-12-07_h100_triton_op_probe/). The default is
    opaque ``custom_op``s."""
    return (_TRITON_OP_REQUESTED and _HAS_TRITON and not triton_interpreter_on()
            and hasattr(torch.library, "triton_op"))


def library_op(name: str, impl: Callable, fake: Callable):
    """Register ``fastdit::<name>`` with ``impl`` (the kernel launch, or reference math where the kernel cannot
    run) and return the op for ``register_autograd``.

    With :func:`traceable_kernels` it is a ``triton_op``: torch.compile traces ``impl`` (its launches go through
    ``fastdit.kernels._utils.launcher``, i.e. ``wrap_triton``), so a compiled model calls the kernels from
    Inductor's code instead of through a Python op — the opaque op cost 0.2-0.4 ms of host time per call
    (SD3-medium profile, issue 18), and its outputs are graph buffers Inductor can plan and reuse. ``impl`` is
    then its own fake (it only allocates and launches). Otherwise (the default) an opaque ``custom_op`` with
    ``fake`` as its fake implementation."""
    qualified = f"fastdit::{name}"
    if traceable_kernels():
        return torch.library.triton_op(qualified, mutates_args=())(impl)
    op = torch.library.custom_op(qualified, mutates_args=())(impl)
    op.register_fake(fake)
    return op


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def owned_outputs(outputs, inputs):
    """Contiguous outputs that share memory with no input and no other output.

    A ``torch.library`` op may not return an input or a view of one (nor two views of one buffer);
    reference math can (an identity cast, a pass-through gradient, slices of one concatenation).
    """
    if any(type(t) is not torch.Tensor for t in outputs):
        # traced (fake or functional tensors: a triton_op's reference path under torch.compile), where storage
        # cannot be compared: fresh copies are always owned
        return tuple(t.clone(memory_format=torch.contiguous_format) for t in outputs)
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    result = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if t.numel() == 0 or ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        result.append(t)
    return tuple(result)
