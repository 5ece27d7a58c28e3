"""Analytic FLOP counts of the models, for MFU.

True FLOPs: 2 × multiply-adds of every matmul-like op — the patch-embedding convolution, every
Linear (timestep/caption embedders, QKV and output projections, MLPs, AdaLN modulation, the final
layer) and both attention matmuls (QKᵀ and AV: 4·N²·D per layer). Elementwise work (norms, softmax,
activations, RoPE, bias adds) is not counted, as in the DiT paper and ``torch.utils.flop_counter``.

DiT-XL/2 at 256 px (latent 4×32×32): 237.2 GFLOP forward (the paper's 118.6 G multiply-adds).
Training (forward + backward) is taken as 3 × forward — backward computes two matmuls per forward
matmul (input and weight gradients): 712 GFLOP per image for DiT-XL/2.

MMDiT counts what runs: caption tokens, padded or not, go through every projection and attention
(padding is masked, not skipped), so pass the padded caption length.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

TRAINING_FLOPS_MULTIPLIER = 3  # forward + backward (2 × forward)


def training_flops(forward_flops: float) -> float:
    """FLOPs of one training step (forward + backward) given the forward FLOPs: 3 × forward."""
    return TRAINING_FLOPS_MULTIPLIER * forward_flops


def _grid(config, height: Optional[int], width: Optional[int]) -> Tuple[int, int]:
    from fastdit.models.layers import to_size2

    default_h, default_w = to_size2(config.input_size)
    height = default_h if height is None else int(height)
    width = default_w if width is None else int(width)
    p = config.patch_size
    if height % p or width % p or height < 1 or width < 1:
        raise ValueError(f"input size {height}×{width} is not a positive multiple of the patch size {p}")
    return height // p, width // p


def _out_channels(config) -> int:
    return config.in_channels * (2 if config.learn_sigma else 1)


def _macs_to_flops(macs: Dict[str, int]) -> Dict[str, int]:
    return {k: 2 * v for k, v in macs.items()}


def dit_flop_breakdown(config, height: Optional[int] = None, width: Optional[int] = None) -> Dict[str, int]:
    """Forward FLOPs of one sample of a :class:`~fastdit.models.DiT` by part, for an input of
    ``height × width`` (the model's input, i.e. latent pixels; default: ``config.input_size``).
    Parts: patch_embed, t_embedder, adaln (blocks), qkv, attention (QKᵀ + AV), proj, mlp, final_layer."""
    gh, gw = _grid(config, height, width)
    N, D, p = gh * gw, config.hidden_size, config.patch_size
    hidden = int(D * config.mlp_ratio)
    depth = config.depth
    macs = {
        "patch_embed": N * config.in_channels * p * p * D,
        "t_embedder": config.frequency_embedding_size * D + D * D,
        "adaln": depth * D * 6 * D,
        "qkv": depth * N * D * 3 * D,
        "attention": depth * 2 * N * N * D,
        "proj": depth * N * D * D,
        "mlp": depth * 2 * N * D * hidden,
        "final_layer": D * 2 * D + N * D * p * p * _out_channels(config),
    }
    return _macs_to_flops(macs)


def dit_flops(config, height: Optional[int] = None, width: Optional[int] = None) -> int:
    """Forward FLOPs of one sample of a DiT (sum of :func:`dit_flop_breakdown`)."""
    return sum(dit_flop_breakdown(config, height, width).values())


def mmdit_flop_breakdown(config, height: Optional[int] = None, width: Optional[int] = None, *,
                         caption_len: int) -> Dict[str, int]:
    """Forward FLOPs of one sample of an :class:`~fastdit.models.MMDiT` by part, for an input of
    ``height × width`` (latent pixels) and ``caption_len`` caption tokens (padded length).

    With ``context_pre_only_last`` (the default), ``depth - 1`` joint blocks run both streams in full and
    the last block is context-pre-only: the caption stream gives keys and values (its queries ride along in
    the joint attention and are discarded), and has no output projection or MLP; else all ``depth`` joint
    blocks are full. ``single_depth`` single-stream blocks run linear1 (QKV + MLP in) and linear2 on all
    N + L tokens (part ``single_blocks``; their attention is in ``attention``, their modulation in
    ``adaln``). Parts ``guidance_embedder`` (with guidance_embed) and ``single_blocks`` (with single_depth)
    appear only when the model has them."""
    if caption_len < 0:
        raise ValueError(f"caption_len must be >= 0, got {caption_len}")
    gh, gw = _grid(config, height, width)
    N, L, D, p = gh * gw, int(caption_len), config.hidden_size, config.patch_size
    hidden = int(D * config.mlp_ratio)
    pre_only = 1 if getattr(config, "context_pre_only_last", True) else 0
    full = config.depth - pre_only
    single = getattr(config, "single_depth", 0)
    pooled_in = getattr(config, "pooled_dim", None) or config.caption_dim
    freq = config.frequency_embedding_size
    per_token_stream = 4 * D * D + 2 * D * hidden  # qkv (3D²) + proj (D²) + MLP
    macs = {
        "patch_embed": N * config.in_channels * p * p * D,
        "context_embedder": L * config.caption_dim * D,
        "t_embedder": freq * D + D * D,
        "pooled_embedder": pooled_in * D + D * D,
        "adaln": full * 2 * D * 6 * D + pre_only * (D * 6 * D + D * 2 * D) + single * D * 3 * D,
        "image_stream": config.depth * N * per_token_stream,
        "caption_stream": full * L * per_token_stream + pre_only * L * 2 * D * D,  # last: K, V only
        "attention": (config.depth + single) * 2 * (N + L) ** 2 * D,
        "final_layer": D * 2 * D + N * D * p * p * _out_channels(config),
    }
    if getattr(config, "guidance_embed", False):
        macs["guidance_embedder"] = freq * D + D * D
    if single:
        # linear1: D -> 3D + hidden; linear2: D + hidden -> D; every token of both streams
        macs["single_blocks"] = single * (N + L) * (D * (3 * D + hidden) + (D + hidden) * D)
    return _macs_to_flops(macs)


def mmdit_flops(config, height: Optional[int] = None, width: Optional[int] = None, *, caption_len: int) -> int:
    """Forward FLOPs of one sample of an MMDiT (sum of :func:`mmdit_flop_breakdown`)."""
    return sum(mmdit_flop_breakdown(config, height, width, caption_len=caption_len).values())
