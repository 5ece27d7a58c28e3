"""``fastdit info``: versions, the device, and which implementation each op takes on this machine."""
from __future__ import annotations

import argparse
import json
from typing import List, Optional

import torch

import fastdit
from fastdit.backend import get_backend, pick_device


def op_paths(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Which implementation each op takes under the current default backend, for typical inputs."""
    from fastdit.ops import adaln, attention, gated_adaln, qk_norm_rotary, rmsnorm, rotary
    from fastdit.ops._common import use_triton

    B, N, D, H, d = 2, 16, 128, 2, 64
    x = torch.zeros(B, N, D, device=device, dtype=dtype)
    m = torch.zeros(B, D, device=device, dtype=torch.float32)
    q = torch.zeros(B, N, H, d, device=device, dtype=dtype)
    w = torch.zeros(d, device=device, dtype=torch.float32)
    freqs = torch.zeros(N, d // 2, 2, device=device)
    cases = {
        "adaln_modulate": (adaln, lambda: adaln.triton_unsupported_reason(x, m, m)),
        "gated_residual_adaln": (gated_adaln, lambda: gated_adaln.triton_unsupported_reason(x, x, m, m, m)),
        "rms_norm": (rmsnorm, lambda: rmsnorm.triton_unsupported_reason(q, w)),
        "rope": (rotary, lambda: rotary.triton_unsupported_reason(q, freqs)),
        "qk_norm_rope": (qk_norm_rotary, lambda: qk_norm_rotary.triton_unsupported_reason(q, q, w, w, freqs)),
        "joint_attention": (attention, lambda: attention.triton_unsupported_reason(q)),
    }
    paths = {}
    for name, (module, reason) in cases.items():
        try:
            fast = use_triton(name, None, reason, module.KERNEL_READY and device.type == "cuda")
            paths[name] = "triton" if fast else ("sdpa (reference)" if name == "joint_attention" else "reference")
        except ValueError as err:
            paths[name] = f"error: {err}"
    from fastdit.ops.linear_gelu import fast_path_reason
    with torch.no_grad():
        try:
            gelu_fast = use_triton("linear_gelu", None, lambda: fast_path_reason(x, x[0], None), True)
            paths["linear_gelu (inference; Mlp takes it under triton)"] = \
                "cuBLASLt GELU epilogue" if gelu_fast else "reference (linear, then GELU)"
        except ValueError as err:
            paths["linear_gelu (inference; Mlp takes it under triton)"] = f"error: {err}"
    from fastdit.ops.fp8_linear import fast_path_reason as fp8_reason
    try:
        weight = torch.zeros(D, D, device=device, dtype=torch.float32)
        reason = fp8_reason(x, weight)
        fast = use_triton("fp8_linear", None, lambda: reason, True)
        paths["fp8_linear (precision=fp8)"] = "torch._scaled_mm" if fast else f"reference (dequantised): {reason}"
    except ValueError as err:
        paths["fp8_linear (precision=fp8)"] = f"error: {err}"
    return paths


def compiled_ops() -> str:
    """What torch.compile makes of the library ops in this process."""
    from fastdit.ops._common import traceable_kernels

    from fastdit.ops._common import COMPILED_MIN_ELEMENTS

    policy = (f"auto takes the elementwise ops only with gradients and >= {COMPILED_MIN_ELEMENTS:,} elements "
              f"(else Inductor's fusion of the reference); ")
    if traceable_kernels():
        return policy + "triton_op: on CUDA, Inductor launches fastdit's kernels from its generated code"
    return policy + ("opaque custom ops, called as Python ops from compiled code (FASTDIT_TRITON_OP=1 with "
                     "compiled Triton makes them triton_ops)")


def run(args: argparse.Namespace) -> int:
    try:
        device = pick_device(args.device)
    except ValueError as err:
        raise SystemExit(f"fastdit: --device: {err}") from None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "fastdit": fastdit.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "default_backend": get_backend(),
        "op_paths (bf16 inputs)": op_paths(device),
        "under torch.compile": compiled_ops(),
    }
    print(json.dumps(info, indent=2))
    return 0


def parser(prog: str = "fastdit info") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Versions, device and the path each op takes here.")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default auto)")
    return p


def main(argv: Optional[List[str]] = None, prog: str = "fastdit info") -> int:
    return run(parser(prog).parse_args(argv))
