"""Functional ops with a backend switch, and their reference implementations.

Every op comes in layers (design.md §3): ``<op>_ref`` (pure PyTorch, the ground truth, same
signature) · ``torch.ops.fastdit.<op>`` (a ``torch.library`` op with a fake impl and autograd, which
torch.compile traces without a graph break) · ``<op>(…, backend=None)`` (the entry point that picks).
"""
from fastdit.ops.adaln import adaln_modulate, adaln_modulate_backward_ref, adaln_modulate_ref
from fastdit.ops.attention import (attention_path, attention_path_choices, joint_attention, joint_attention_qk,
                                   joint_attention_ref, joint_attention_sdpa, set_attention_path,
                                   set_attention_path_choices)
from fastdit.ops.gated_adaln import (gated_residual_adaln, gated_residual_adaln_backward_ref,
                                     gated_residual_adaln_ref)
from fastdit.ops.fp8_linear import (RECIPES, Fp8Recipe, dequantize, fp8_linear, fp8_linear_ref, quantize_rows,
                                   quantize_tensor)
from fastdit.ops.linear_gelu import linear_gelu, linear_gelu_ref
from fastdit.ops.qk_norm_rotary import qk_norm_rope, qk_norm_rope_ref
from fastdit.ops.rmsnorm import rms_norm, rms_norm_backward_ref, rms_norm_ref
from fastdit.ops.rotary import rope, rope_, rope_freqs, rope_freqs_1d, rope_freqs_2d, rope_ref

__all__ = [
    "adaln_modulate", "adaln_modulate_ref", "adaln_modulate_backward_ref",
    "gated_residual_adaln", "gated_residual_adaln_ref", "gated_residual_adaln_backward_ref",
    "rms_norm", "rms_norm_ref", "rms_norm_backward_ref",
    "rope", "rope_", "rope_ref", "rope_freqs", "rope_freqs_1d", "rope_freqs_2d",
    "qk_norm_rope", "qk_norm_rope_ref",
    "linear_gelu", "linear_gelu_ref",
    "fp8_linear", "fp8_linear_ref", "quantize_rows", "quantize_tensor", "dequantize", "Fp8Recipe", "RECIPES",
    "joint_attention", "joint_attention_qk", "joint_attention_ref", "joint_attention_sdpa",
    "attention_path", "set_attention_path", "attention_path_choices", "set_attention_path_choices",
]
