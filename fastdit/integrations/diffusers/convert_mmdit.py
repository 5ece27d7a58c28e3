"""Exact weight converters between diffusers' ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` and
fastdit's :class:`~fastdit.models.MMDiT`.

    from fastdit.integrations.diffusers.convert_mmdit import mmdit_from_flux, flux_pack, flux_unpack
    mmdit = mmdit_from_flux(FluxTransformer2DModel.from_pretrained(..., subfolder="transformer"))
    sd3 = sd3_from_mmdit(mmdit_from_sd3(transformer))          # and back; the same for Flux

Calling conventions (same inputs, same output):

- **SD3** (``mmdit_from_sd3`` / ``sd3_from_mmdit``)::

      transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
      == mmdit(x, t, ctx, pooled=pooled)

  x (B, C, H, W) latents, ctx (B, L, joint_attention_dim), pooled (B, pooled_projection_dim), t (B,) in the
  units the pipeline passes (0..1000: sigma · 1000). SD3 has no caption mask: its pipelines attend to every
  (padded) T5 token, so pass no ``context_mask`` to reproduce them. With ``context_mask`` fastdit leaves the
  padded tokens out, which equals diffusers run on the truncated caption.
- **Flux** (``mmdit_from_flux`` / ``flux_from_mmdit``): diffusers takes 2 × 2-packed latents and position ids,
  fastdit the latent image::

      out = transformer(hidden_states=flux_pack(x), encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=t, img_ids=flux_image_ids(H, W), txt_ids=flux_text_ids(L), guidance=g).sample
      flux_unpack(out, H, W) == mmdit(x, 1000 * t, ctx, pooled=pooled, guidance=1000 * g)

  x (B, C, H, W) (C = in_channels / 4: 16 for FLUX.1), t in [0, 1] (diffusers multiplies it by 1000 inside;
  fastdit takes model units, so pass 1000 · t, and the same for ``guidance``, given only to guidance-distilled
  models, ``guidance_embeds``). Diffusers first casts t and guidance to the model dtype: for bitwise equality in
  bfloat16/float16 pass ``t.to(dtype) * 1000`` (a tensor of that dtype) to fastdit too. The ids must be
  Flux's standard ones (image (0, row, col) over the H/2 × W/2 grid, caption all 0, which is the identity
  rotation, and what fastdit assumes); other ids (e.g. Kontext's reference-image offsets) are not
  representable. Flux's stock forward has no caption mask; fastdit's ``context_mask`` leaves padded tokens
  out (equal to diffusers on the truncated caption).

Weight mapping (diffusers -> fastdit; Linear weights and biases alike):

- ``pos_embed.proj`` (SD3's Conv2d) -> ``x_embedder.proj``; Flux's ``x_embedder`` (a Linear on the packed
  features, in (channel, patch row, patch column) order, which is the Conv2d kernel's flattening) ->
  ``x_embedder.proj`` with the weight reshaped to (D, C, 2, 2);
- ``time_text_embed.timestep_embedder.linear_{1,2}`` -> ``t_embedder.mlp.{0,2}``; ``…text_embedder.linear_{1,2}``
  -> ``pooled_embedder.mlp.{0,2}``; ``…guidance_embedder.linear_{1,2}`` -> ``guidance_embedder.mlp.{0,2}``;
  ``context_embedder`` -> ``context_embedder``;
- double blocks ``transformer_blocks.{i}`` -> ``blocks.{i}``: ``norm1.linear`` -> ``adaLN_modulation.1`` and
  ``norm1_context.linear`` -> ``txt_adaLN_modulation.1`` (same chunk order: shift, scale, gate of the
  attention, then of the MLP); ``attn.to_{q,k,v}`` -> ``attn.qkv`` and ``attn.add_{q,k,v}_proj`` ->
  ``attn.txt_qkv`` (concatenated along the output features); ``attn.norm_{q,k}`` -> ``attn.{q,k}_norm``,
  ``attn.norm_added_{q,k}`` -> ``attn.txt_{q,k}_norm``; ``attn.to_out.0`` -> ``attn.proj``, ``attn.to_add_out``
  -> ``attn.txt_proj``; ``ff.net.0.proj`` / ``ff.net.2`` -> ``mlp.fc1`` / ``mlp.fc2``, ``ff_context`` -> ``txt_mlp``;
- SD3's context-pre-only last block: ``norm1_context`` is an ``AdaLayerNormContinuous`` whose linear yields
  (scale, shift) -> ``txt_adaLN_modulation.1`` (shift, scale): its two row halves swap;
  ``attn.add_{k,v}_proj`` -> ``attn.txt_kv``; ``attn.norm_added_k`` -> ``attn.txt_k_norm``. Its caption
  queries (``attn.add_q_proj``, ``attn.norm_added_q``) feed only caption outputs that nothing reads: they are
  dropped, which leaves the output exactly the same. Going back, :func:`sd3_from_mmdit` fills
  ``add_q_proj`` with zeros and ``norm_added_q`` with ones (its initial value); a round trip returns every
  other tensor unchanged;
- Flux's single blocks ``single_transformer_blocks.{i}`` -> ``single_blocks.{i}``: ``norm.linear`` ->
  ``adaLN_modulation.1`` (shift, scale, gate); ``attn.to_{q,k,v}`` and ``proj_mlp`` -> ``linear1``
  (concatenated in that order); ``attn.norm_{q,k}`` -> ``{q,k}_norm``; ``proj_out`` -> ``linear2`` (its input is
  [attention, MLP] in both);
- ``norm_out.linear`` (scale, shift) -> ``final_layer.adaLN_modulation.1`` (shift, scale): halves swap;
  ``proj_out`` -> ``final_layer.linear``; for Flux its rows are permuted from the packed (channel, patch row,
  patch column) order to fastdit's (patch row, patch column, channel).
- SD3's fixed position table (``pos_embed.pos_embed``, a buffer in SD3's state dict) is recomputed by fastdit
  (``pos_embed="sincos_crop"``, a non-persistent buffer); the converters check that the two agree (to the
  rounding of the checkpoint's dtype) and copy the source's values across, so outputs match exactly.

Where diffusers computes differently from fastdit (all are rounding-level, none changes the math):

1. Timestep embedding: diffusers computes the sinusoidal embedding in float32 whatever the model dtype; fastdit
   too, except in float64 models (float64). Bitwise equal in float32/bfloat16/float16.
2. Flux's RoPE: diffusers rotates q and k in float32 (``x.float()``) and casts back; fastdit rotates in the
   compute dtype (float32 for half precision inputs, float64 for float64). The cos/sin tables are float32 in
   both (equal values).
3. SD3's QK RMSNorm (``qk_norm="rms_norm"``, diffusers' ``RMSNorm``) computes the mean square in float32 even
   for float64 inputs; fastdit's uses the compute dtype. Flux's QK-norm (``torch.nn.RMSNorm``) does not.
4. Flux casts t and guidance to the model dtype before multiplying by 1000 (see above).
5. Flux in float16 clips each block's residual streams to ±65504; fastdit does not clip (values beyond that
   range are inf in fastdit, ±65504 in diffusers; below it the two agree).

Call options of the diffusers forwards that have no fastdit counterpart: SD3's ``skip_layers`` and
``block_controlnet_hidden_states``, Flux's ``controlnet_*`` residuals, IP-adapter ``joint_attention_kwargs``.

So float64 models agree to ~1e-7 relative as they stand, and to float64 rounding (~1e-12) once diffusers'
float32 steps above are made float64 (the tests do that); float32 models agree to float32 rounding.

Refused (ValueError naming the field): SD3.5's ``dual_attention_layers`` (``SD35AdaLayerNormZeroX``, ``attn2``),
``qk_norm`` other than None / "rms_norm" (e.g. "layer_norm"), ``pos_embed_max_size`` None, a
``caption_projection_dim`` other than the model width, Flux's ``patch_size`` other than 1, ``in_channels`` not a
multiple of 4, ``out_channels`` other than in_channels or 2 × in_channels (e.g. FLUX.1-Fill's), ``axes_dims_rope``
not summing to the head dim, and config fields these converters do not know. A model with LoRA adapters or
other extra modules (keys the mapping does not cover) is refused too: merge (``fuse_lora``) and unload them first.
Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fastdit.models.layers import to_size2
from fastdit.models.mmdit import MMDiT, MMDiTConfig, sincos_crop_table

# fixed in diffusers' code, not in its configs
DIFFUSERS_FREQUENCY_EMBEDDING_SIZE = 256
DIFFUSERS_MLP_RATIO = 4.0
FLUX_ROPE_THETA = 10000.0
FLUX_PACK = 2  # Flux pipelines pack 2 × 2 latent patches into one token
FLUX_INPUT_SIZE = 128  # fastdit config input_size for Flux (1024 px latents); only sets defaults (FLOP counts)

_SD3_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
               "pos_embed_max_size", "dual_attention_layers", "qk_norm")
_FLUX_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
                "axes_dims_rope")


# ------------------------------------------------------------------------------------------- helpers

def flux_pack(latents: Tensor, patch: int = FLUX_PACK) -> Tensor:
    """(B, C, H, W) latents -> (B, (H/2)·(W/2), 4C) tokens as Flux pipelines pack them (``_pack_latents``):
    tokens row-major over the H/2 × W/2 grid, features in (channel, patch row, patch column) order."""
    B, C, H, W = latents.shape
    if H % patch or W % patch:
        raise ValueError(f"flux_pack: latent size {H}×{W} is not a multiple of {patch}")
    x = latents.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // patch) * (W // patch), C * patch * patch)


def flux_unpack(tokens: Tensor, height: int, width: int, patch: int = FLUX_PACK) -> Tensor:
    """Inverse of :func:`flux_pack`: (B, (H/2)·(W/2), 4C) -> (B, C, H, W) (Flux pipelines' ``_unpack_latents``,
    with height/width in latent pixels)."""
    B, N, F = tokens.shape
    gh, gw = height // patch, width // patch
    if height % patch or width % patch or N != gh * gw or F % (patch * patch):
        raise ValueError(f"flux_unpack: tokens {tuple(tokens.shape)} do not pack a {height}×{width} latent")
    C = F // (patch * patch)
    x = tokens.reshape(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, height, width)


def flux_image_ids(height: int, width: int, *, axes: int = 3, patch: int = FLUX_PACK, device=None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Flux's image position ids for a ``height × width`` latent: (H/2·W/2, axes), rows (0, …, row, col) —
    the pipelines' ``_prepare_latent_image_ids``."""
    gh, gw = height // patch, width // patch
    ids = torch.zeros(gh, gw, axes, device=device, dtype=dtype)
    ids[..., -2] = torch.arange(gh, device=device, dtype=dtype)[:, None]
    ids[..., -1] = torch.arange(gw, device=device, dtype=dtype)[None, :]
    return ids.reshape(gh * gw, axes)


def flux_text_ids(length: int, *, axes: int = 3, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Flux's caption position ids: zeros (L, axes) (the identity rotation)."""
    return torch.zeros(length, axes, device=device, dtype=dtype)


def _diffusers_class(name: str):
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - environment problem
        raise ImportError(f"the MMDiT converters need diffusers (pip install diffusers): {err}") from err
    return getattr(diffusers, name)


def _defaults(cls) -> Dict[str, Any]:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_values(config: Any, who: str, known: Sequence[str], cls_name: str) -> Dict[str, Any]:
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    if not isinstance(config, Mapping):
        raise ValueError(f"{who}: expected a {cls_name} config (a mapping) or model, got {type(config).__name__}")
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"diffusers {cls_name} config: unknown field(s) {', '.join(unknown)}; the converter knows "
                         f"{', '.join(known)} (a newer diffusers may mean something this conversion misses)")
    return {**_defaults(_diffusers_class(cls_name)), **values}


def _bad(cls_name: str, cfg: Mapping[str, Any], field: str, why: str) -> ValueError:
    return ValueError(f"diffusers {cls_name} config: {field}={cfg[field]!r} is not supported: {why}")


def _check_ints(cls_name: str, cfg: Mapping[str, Any], fields: Sequence[str]) -> None:
    for field in fields:
        if not _is_positive_int(cfg[field]):
            raise _bad(cls_name, cfg, field, "must be a positive int")


def _learn_sigma(cls_name: str, cfg: Mapping[str, Any], c_in: int, c_out: Optional[int], unit: int = 1) -> bool:
    c_out = c_in if c_out is None else c_out
    if isinstance(c_out, bool) or c_out not in (c_in, 2 * c_in):
        raise _bad(cls_name, cfg, "out_channels", f"fastdit's MMDiT outputs in_channels ({c_in // unit} latent "
                   f"channels) or 2 × in_channels (learned sigma)")
    return c_out == 2 * c_in


def _fastdit_bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"MMDiTConfig.{field}={value!r} has no diffusers equivalent: {why}")


# ------------------------------------------------------------------------------------------- configs

def mmdit_config_from_sd3(config: Any) -> MMDiTConfig:
    """The :class:`~fastdit.models.MMDiTConfig` of a diffusers ``SD3Transformer2DModel`` config (its ``.config``,
    a mapping of the same fields, or the model): ``pos_embed="sincos_crop"``, ``pooled_dim``, QK-norm from
    ``qk_norm``, a context-pre-only last block. ValueError naming the field for what it cannot hold (see the
    module docstring)."""
    name = "SD3Transformer2DModel"
    cfg = _config_values(config, "mmdit_config_from_sd3", _SD3_FIELDS, name)
    _check_ints(name, cfg, ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                            "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                            "pooled_projection_dim"))
    if tuple(cfg["dual_attention_layers"] or ()):
        raise _bad(name, cfg, "dual_attention_layers", "SD3.5's dual-attention blocks (SD35AdaLayerNormZeroX, "
                   "attn2) are not supported by fastdit's MMDiT")
    if cfg["qk_norm"] not in (None, "rms_norm"):
        raise _bad(name, cfg, "qk_norm", "fastdit's QK-norm is RMSNorm (qk_norm='rms_norm') or none (None)")
    if not _is_positive_int(cfg["pos_embed_max_size"]):
        raise _bad(name, cfg, "pos_embed_max_size", "fastdit reproduces SD3's cropped position table, which needs "
                   "a positive int (None means an interpolated table)")
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_projection_dim"] != D:
        raise _bad(name, cfg, "caption_projection_dim", f"the caption stream must have the model width "
                   f"num_attention_heads × attention_head_dim = {D}")
    learn_sigma = _learn_sigma(name, cfg, cfg["in_channels"], cfg["out_channels"])
    try:
        return MMDiTConfig(input_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                           hidden_size=D, depth=cfg["num_layers"], num_heads=cfg["num_attention_heads"],
                           mlp_ratio=DIFFUSERS_MLP_RATIO, caption_dim=cfg["joint_attention_dim"],
                           qk_norm=cfg["qk_norm"] == "rms_norm", pos_embed="sincos_crop", learn_sigma=learn_sigma,
                           frequency_embedding_size=DIFFUSERS_FREQUENCY_EMBEDDING_SIZE, context_pre_only_last=True,
                           pooled_dim=cfg["pooled_projection_dim"], pos_embed_max_size=cfg["pos_embed_max_size"])
    except ValueError as err:
        raise ValueError(f"diffusers {name} config has no fastdit MMDiTConfig: {err}") from err


def mmdit_config_from_flux(config: Any) -> MMDiTConfig:
    """The :class:`~fastdit.models.MMDiTConfig` of a diffusers ``FluxTransformer2DModel`` config: patch size 2
    on the unpacked latent (in_channels / 4 channels), ``single_depth = num_single_layers``, full double blocks,
    ``pooled_dim``, ``guidance_embed``, RoPE with ``rope_axes_dims = axes_dims_rope`` (theta 10000).
    ``input_size`` is 128 (1024-px latents; it only sets defaults such as FLOP counts). ValueError naming the
    field for what it cannot hold (see the module docstring)."""
    name = "FluxTransformer2DModel"
    cfg = _config_values(config, "mmdit_config_from_flux", _FLUX_FIELDS, name)
    _check_ints(name, cfg, ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                            "joint_attention_dim", "pooled_projection_dim"))
    if cfg["patch_size"] != 1:
        raise _bad(name, cfg, "patch_size", "Flux pipelines pack 2 × 2 patches outside the transformer "
                   "(patch_size=1); fastdit's patch size 2 is that packing")
    if cfg["in_channels"] % (FLUX_PACK * FLUX_PACK):
        raise _bad(name, cfg, "in_channels", "must be 4 × the latent channels (2 × 2 packed)")
    n_single = cfg["num_single_layers"]
    if isinstance(n_single, bool) or not isinstance(n_single, int) or n_single < 0:
        raise _bad(name, cfg, "num_single_layers", "must be an int >= 0")
    if not isinstance(cfg["guidance_embeds"], bool):
        raise _bad(name, cfg, "guidance_embeds", "must be a bool")
    head_dim = cfg["attention_head_dim"]
    axes = cfg["axes_dims_rope"]
    if (not isinstance(axes, (list, tuple)) or len(axes) < 2
            or not all(_is_positive_int(a) and a % 2 == 0 for a in axes) or sum(axes) != head_dim):
        raise _bad(name, cfg, "axes_dims_rope", f"must be >= 2 positive even ints summing to attention_head_dim "
                   f"({head_dim})")
    c_lat = cfg["in_channels"] // (FLUX_PACK * FLUX_PACK)
    learn_sigma = _learn_sigma(name, cfg, cfg["in_channels"], cfg["out_channels"], unit=FLUX_PACK * FLUX_PACK)
    try:
        return MMDiTConfig(input_size=FLUX_INPUT_SIZE, patch_size=FLUX_PACK, in_channels=c_lat,
                           hidden_size=cfg["num_attention_heads"] * head_dim, depth=cfg["num_layers"],
                           num_heads=cfg["num_attention_heads"], mlp_ratio=DIFFUSERS_MLP_RATIO,
                           caption_dim=cfg["joint_attention_dim"], qk_norm=True, pos_embed="rope",
                           rope_theta=FLUX_ROPE_THETA, learn_sigma=learn_sigma,
                           frequency_embedding_size=DIFFUSERS_FREQUENCY_EMBEDDING_SIZE, single_depth=n_single,
                           context_pre_only_last=False, pooled_dim=cfg["pooled_projection_dim"],
                           guidance_embed=cfg["guidance_embeds"], rope_axes_dims=tuple(axes))
    except ValueError as err:
        raise ValueError(f"diffusers {name} config has no fastdit MMDiTConfig: {err}") from err


def _check_common_back(config: MMDiTConfig, who: str) -> None:
    if not isinstance(config, MMDiTConfig):
        raise ValueError(f"{who}: expected an MMDiTConfig, got {type(config).__name__}")
    if config.mlp_ratio != DIFFUSERS_MLP_RATIO:
        raise _fastdit_bad("mlp_ratio", config.mlp_ratio, "diffusers' MMDiT MLPs are 4 × the width")
    if config.frequency_embedding_size != DIFFUSERS_FREQUENCY_EMBEDDING_SIZE:
        raise _fastdit_bad("frequency_embedding_size", config.frequency_embedding_size,
                           "diffusers embeds timesteps with 256 frequencies")
    if config.pooled_dim is None:
        raise _fastdit_bad("pooled_dim", None, "SD3 and Flux take a separate pooled caption vector; a model that "
                           "pools its caption tokens has no equivalent")


def sd3_config_from_mmdit(config: MMDiTConfig) -> Dict[str, Any]:
    """The ``SD3Transformer2DModel(**kwargs)`` arguments of an :class:`~fastdit.models.MMDiTConfig`. ValueError
    naming the field for what SD3 cannot hold: ``pos_embed`` other than "sincos_crop", a non-square
    ``input_size``, ``single_depth`` > 0, ``context_pre_only_last`` False, ``guidance_embed``, ``pooled_dim``
    None, ``mlp_ratio`` other than 4, ``frequency_embedding_size`` other than 256."""
    _check_common_back(config, "sd3_config_from_mmdit")
    if config.pos_embed != "sincos_crop":
        raise _fastdit_bad("pos_embed", config.pos_embed, "SD3 adds the cropped sin-cos table ('sincos_crop')")
    h, w = to_size2(config.input_size)
    if h != w:
        raise _fastdit_bad("input_size", config.input_size, "SD3's sample_size is square")
    if config.single_depth:
        raise _fastdit_bad("single_depth", config.single_depth, "SD3 has no single-stream blocks")
    if not config.context_pre_only_last:
        raise _fastdit_bad("context_pre_only_last", False, "SD3's last block is context-pre-only")
    if config.guidance_embed:
        raise _fastdit_bad("guidance_embed", True, "SD3 has no guidance embedding")
    return dict(sample_size=h, patch_size=config.patch_size, in_channels=config.in_channels, num_layers=config.depth,
                attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
                joint_attention_dim=config.caption_dim, caption_projection_dim=config.hidden_size,
                pooled_projection_dim=config.pooled_dim, out_channels=config.out_channels,
                pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=(),
                qk_norm="rms_norm" if config.qk_norm else None)


def flux_config_from_mmdit(config: MMDiTConfig) -> Dict[str, Any]:
    """The ``FluxTransformer2DModel(**kwargs)`` arguments of an :class:`~fastdit.models.MMDiTConfig`. ValueError
    naming the field for what Flux cannot hold: ``pos_embed`` other than "rope" with ``rope_axes_dims``,
    ``rope_theta`` other than 10000, ``patch_size`` other than 2, ``qk_norm`` False, ``context_pre_only_last``
    True, ``pooled_dim`` None, ``mlp_ratio`` other than 4, ``frequency_embedding_size`` other than 256."""
    _check_common_back(config, "flux_config_from_mmdit")
    if config.pos_embed != "rope" or config.rope_axes_dims is None:
        raise _fastdit_bad("rope_axes_dims", config.rope_axes_dims, "Flux uses multi-axis RoPE (pos_embed='rope' "
                           "with rope_axes_dims, e.g. (16, 56, 56))")
    if config.rope_theta != FLUX_ROPE_THETA:
        raise _fastdit_bad("rope_theta", config.rope_theta, "Flux's RoPE theta is 10000")
    if config.patch_size != FLUX_PACK:
        raise _fastdit_bad("patch_size", config.patch_size, "Flux pipelines pack 2 × 2 patches")
    if not config.qk_norm:
        raise _fastdit_bad("qk_norm", False, "Flux always normalises q and k")
    if config.context_pre_only_last:
        raise _fastdit_bad("context_pre_only_last", True, "Flux's double blocks are all full")
    packed = FLUX_PACK * FLUX_PACK
    return dict(patch_size=1, in_channels=config.in_channels * packed, out_channels=config.out_channels * packed,
                num_layers=config.depth, num_single_layers=config.single_depth, attention_head_dim=config.head_dim,
                num_attention_heads=config.num_heads, joint_attention_dim=config.caption_dim,
                pooled_projection_dim=config.pooled_dim, guidance_embeds=config.guidance_embed,
                axes_dims_rope=tuple(config.rope_axes_dims))


# ------------------------------------------------------------------------------------- weight mapping
# A rule maps one fastdit tensor to one or more diffusers tensors: "copy", "cat" (rows concatenated),
# "swap" (the two row halves exchanged: (scale, shift) <-> (shift, scale)), "patch_in" (Flux's packed Linear
# <-> fastdit's Conv2d kernel) and "packed_out" (Flux's output rows (c, pr, pc) <-> fastdit's (pr, pc, c)).

@dataclasses.dataclass(frozen=True)
class _Rule:
    dst: str                 # fastdit key
    src: Tuple[str, ...]     # diffusers key(s)
    kind: str = "copy"


def _linear(dst: str, *src: str, kind: str = "copy", bias: bool = True) -> List[_Rule]:
    names = ("weight", "bias") if bias else ("weight",)
    return [_Rule(f"{dst}.{n}", tuple(f"{s}.{n}" for s in src), kind) for n in names]


def _norm(dst: str, src: str) -> List[_Rule]:
    return [_Rule(f"{dst}.weight", (f"{src}.weight",))]


def _embedder_rules(guidance: bool) -> List[_Rule]:
    rules = (_linear("context_embedder", "context_embedder")
             + _linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
             + _linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
             + _linear("pooled_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
             + _linear("pooled_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"))
    if guidance:
        rules += (_linear("guidance_embedder.mlp.0", "time_text_embed.guidance_embedder.linear_1")
                  + _linear("guidance_embedder.mlp.2", "time_text_embed.guidance_embedder.linear_2"))
    return rules


def _double_block_rules(i: int, qk_norm: bool) -> List[_Rule]:
    f, d = f"blocks.{i}.", f"transformer_blocks.{i}."
    rules = (_linear(f + "adaLN_modulation.1", d + "norm1.linear")
             + _linear(f + "txt_adaLN_modulation.1", d + "norm1_context.linear")
             + _linear(f + "attn.qkv", *(d + f"attn.to_{x}" for x in "qkv"), kind="cat")
             + _linear(f + "attn.txt_qkv", *(d + f"attn.add_{x}_proj" for x in "qkv"), kind="cat")
             + _linear(f + "attn.proj", d + "attn.to_out.0")
             + _linear(f + "attn.txt_proj", d + "attn.to_add_out")
             + _linear(f + "mlp.fc1", d + "ff.net.0.proj") + _linear(f + "mlp.fc2", d + "ff.net.2")
             + _linear(f + "txt_mlp.fc1", d + "ff_context.net.0.proj")
             + _linear(f + "txt_mlp.fc2", d + "ff_context.net.2"))
    if qk_norm:
        rules += (_norm(f + "attn.q_norm", d + "attn.norm_q") + _norm(f + "attn.k_norm", d + "attn.norm_k")
                  + _norm(f + "attn.txt_q_norm", d + "attn.norm_added_q")
                  + _norm(f + "attn.txt_k_norm", d + "attn.norm_added_k"))
    return rules


def _pre_only_block_rules(i: int, qk_norm: bool) -> Tuple[List[_Rule], List[str]]:
    """Rules of SD3's context-pre-only last block, and the diffusers keys it drops (the caption queries)."""
    f, d = f"blocks.{i}.", f"transformer_blocks.{i}."
    rules = (_linear(f + "adaLN_modulation.1", d + "norm1.linear")
             + _linear(f + "txt_adaLN_modulation.1", d + "norm1_context.linear", kind="swap")
             + _linear(f + "attn.qkv", *(d + f"attn.to_{x}" for x in "qkv"), kind="cat")
             + _linear(f + "attn.txt_kv", *(d + f"attn.add_{x}_proj" for x in "kv"), kind="cat")
             + _linear(f + "attn.proj", d + "attn.to_out.0")
             + _linear(f + "mlp.fc1", d + "ff.net.0.proj") + _linear(f + "mlp.fc2", d + "ff.net.2"))
    dropped = [d + "attn.add_q_proj.weight", d + "attn.add_q_proj.bias"]
    if qk_norm:
        rules += (_norm(f + "attn.q_norm", d + "attn.norm_q") + _norm(f + "attn.k_norm", d + "attn.norm_k")
                  + _norm(f + "attn.txt_k_norm", d + "attn.norm_added_k"))
        dropped.append(d + "attn.norm_added_q.weight")
    return rules, dropped


def _single_block_rules(i: int) -> List[_Rule]:
    f, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    return (_linear(f + "adaLN_modulation.1", d + "norm.linear")
            + _linear(f + "linear1", *(d + f"attn.to_{x}" for x in "qkv"), d + "proj_mlp", kind="cat")
            + _linear(f + "linear2", d + "proj_out")
            + _norm(f + "q_norm", d + "attn.norm_q") + _norm(f + "k_norm", d + "attn.norm_k"))


def _sd3_rules(config: MMDiTConfig) -> Tuple[List[_Rule], List[str]]:
    rules = _linear("x_embedder.proj", "pos_embed.proj") + _embedder_rules(False)
    for i in range(config.depth - 1):
        rules += _double_block_rules(i, config.qk_norm)
    last, dropped = _pre_only_block_rules(config.depth - 1, config.qk_norm)
    rules += last
    rules += (_linear("final_layer.adaLN_modulation.1", "norm_out.linear", kind="swap")
              + _linear("final_layer.linear", "proj_out"))
    return rules, dropped


def _flux_rules(config: MMDiTConfig) -> List[_Rule]:
    rules = _linear("x_embedder.proj", "x_embedder", kind="patch_in") + _embedder_rules(config.guidance_embed)
    for i in range(config.depth):
        rules += _double_block_rules(i, True)
    for i in range(config.single_depth):
        rules += _single_block_rules(i)
    rules += (_linear("final_layer.adaLN_modulation.1", "norm_out.linear", kind="swap")
              + _linear("final_layer.linear", "proj_out", kind="packed_out"))
    return rules


def _swap(t: Tensor) -> Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def _packed_to_fastdit(t: Tensor, p: int = FLUX_PACK) -> Tensor:
    """Rows (c, pr, pc) -> (pr, pc, c)."""
    C = t.shape[0] // (p * p)
    return t.reshape(C, p, p, *t.shape[1:]).permute(1, 2, 0, *range(3, t.dim() + 2)).reshape(t.shape)


def _fastdit_to_packed(t: Tensor, p: int = FLUX_PACK) -> Tensor:
    """Rows (pr, pc, c) -> (c, pr, pc)."""
    C = t.shape[0] // (p * p)
    return t.reshape(p, p, C, *t.shape[1:]).permute(2, 0, 1, *range(3, t.dim() + 2)).reshape(t.shape)


def _to_fastdit(rule: _Rule, src: Mapping[str, Tensor], like: Tensor) -> Tensor:
    tensors = [src[k] for k in rule.src]
    if rule.kind == "cat":
        out = torch.cat(tensors, dim=0)
    elif rule.kind == "swap":
        out = _swap(tensors[0])
    elif rule.kind == "packed_out":
        out = _packed_to_fastdit(tensors[0])
    elif rule.kind == "patch_in":
        out = tensors[0].reshape(like.shape)
    else:
        out = tensors[0]
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"{' + '.join(rule.src)} has shape {tuple(out.shape)}, fastdit's {rule.dst} "
                         f"{tuple(like.shape)}: the model does not match its config")
    return out.detach().clone()


def _from_fastdit(rule: _Rule, value: Tensor, likes: Sequence[Tensor]) -> List[Tensor]:
    if rule.kind == "cat":
        outs = list(value.split([like.shape[0] for like in likes], dim=0))
    elif rule.kind == "swap":
        outs = [_swap(value)]
    elif rule.kind == "packed_out":
        outs = [_fastdit_to_packed(value)]
    elif rule.kind == "patch_in":
        outs = [value.reshape(likes[0].shape)]
    else:
        outs = [value]
    for out, like, key in zip(outs, likes, rule.src):
        if tuple(out.shape) != tuple(like.shape):
            raise ValueError(f"fastdit's {rule.dst} gives {key} the shape {tuple(out.shape)}, expected "
                             f"{tuple(like.shape)}")
    return [o.detach().clone() for o in outs]


def _check_keys(have: Sequence[str], used: Sequence[str], who: str) -> None:
    have, used = set(have), set(used)
    missing, extra = sorted(used - have), sorted(have - used)
    if missing or extra:
        raise ValueError(f"{who}: the state dict does not match the mapping of its config (missing "
                         f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                         f"{'…' if len(extra) > 5 else ''}); LoRA adapters or other extra modules must be merged "
                         f"and unloaded first")


def _build_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def _finish(model: nn.Module, state: Dict[str, Tensor], training: bool,
            buffers: Optional[Dict[str, Tensor]] = None) -> nn.Module:
    model.load_state_dict(state, strict=True, assign=True)
    for name, value in (buffers or {}).items():  # non-persistent buffers (not in the state dict)
        setattr(model, name, value)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a tensor the mapping did not fill
        raise RuntimeError(f"conversion left tensors unset: {left[:5]}")
    return model.train(training)


def _source_training(model: nn.Module) -> bool:
    return bool(getattr(model, "training", False))


def _check_table(ours: Tensor, theirs: Tensor) -> None:
    """SD3's stored table against fastdit's recomputation (float32), within the rounding of its dtype."""
    if tuple(theirs.shape) != tuple(ours.shape):
        raise ValueError(f"SD3 pos_embed.pos_embed has shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}")
    tol = 1e-6 if theirs.dtype in (torch.float32, torch.float64) else 1e-2
    diff = (theirs.detach().float().cpu() - ours).abs().max().item()
    if not diff <= tol:
        raise ValueError(f"SD3 pos_embed.pos_embed differs from the sin-cos table of its config by {diff:.3g} "
                         f"(sample_size / patch_size / pos_embed_max_size do not describe it)")


def _sd3_table(config: MMDiTConfig) -> Tensor:
    return sincos_crop_table(config.hidden_size, config.pos_embed_max_size, config.grid_size[0]).unsqueeze(0)


# ------------------------------------------------------------------------------------------ converters

def mmdit_from_sd3(model: nn.Module, *, backend: Optional[str] = None) -> MMDiT:
    """A fastdit :class:`~fastdit.models.MMDiT` with the weights of a diffusers ``SD3Transformer2DModel`` (same
    dtype and device, tensors copied, train/eval mode kept). Its output equals diffusers' (see the module
    docstring for the call). The last block's caption-query weights (``add_q_proj``, ``norm_added_q``) are
    dropped: they affect no output."""
    config = mmdit_config_from_sd3(model.config)
    src = model.state_dict()
    rules, dropped = _sd3_rules(config)
    _check_keys(list(src), [k for r in rules for k in r.src] + dropped + ["pos_embed.pos_embed"],
                "mmdit_from_sd3")
    ours = _build_meta(lambda: MMDiT(config, backend=backend))
    like = ours.state_dict()
    state = {r.dst: _to_fastdit(r, src, like[r.dst]) for r in rules}
    table = src["pos_embed.pos_embed"]
    _check_table(_sd3_table(config), table)
    # SD3's own values (its checkpoints store the table), equal to fastdit's to the checkpoint's rounding
    return _finish(ours, state, _source_training(model), {"pos_embed": table.detach().clone()})


def sd3_from_mmdit(model: MMDiT) -> nn.Module:
    """A diffusers ``SD3Transformer2DModel`` with the weights of a fastdit :class:`~fastdit.models.MMDiT`
    (config: :func:`sd3_config_from_mmdit`). The last block's caption queries, which fastdit does not have and
    which affect no output, get ``add_q_proj`` = 0 and ``norm_added_q.weight`` = 1. ``pos_embed.pos_embed`` is
    fastdit's table."""
    if not isinstance(model, MMDiT):
        raise ValueError(f"sd3_from_mmdit: expected a fastdit MMDiT, got {type(model).__name__}")
    kwargs = sd3_config_from_mmdit(model.config)
    cls = _diffusers_class("SD3Transformer2DModel")
    theirs = _build_meta(lambda: cls(**kwargs))
    like = theirs.state_dict()
    rules, dropped = _sd3_rules(model.config)
    src = model.state_dict()
    _check_keys(list(src), [r.dst for r in rules], "sd3_from_mmdit")
    state: Dict[str, Tensor] = {}
    for r in rules:
        state.update(zip(r.src, _from_fastdit(r, src[r.dst], [like[k] for k in r.src])))
    ref = src["final_layer.linear.weight"]
    for key in dropped:
        fill = torch.ones if key.endswith("norm_added_q.weight") else torch.zeros
        state[key] = fill(like[key].shape, dtype=ref.dtype, device=ref.device)
    state["pos_embed.pos_embed"] = model.pos_embed.detach().clone()
    _check_keys(list(like), list(state), "sd3_from_mmdit")
    return _finish(theirs, state, model.training)


def mmdit_from_flux(model: nn.Module, *, backend: Optional[str] = None) -> MMDiT:
    """A fastdit :class:`~fastdit.models.MMDiT` with the weights of a diffusers ``FluxTransformer2DModel`` (same
    dtype and device, tensors copied, train/eval mode kept). Its output on the unpacked latent equals
    diffusers' on the packed one (see the module docstring for the call)."""
    config = mmdit_config_from_flux(model.config)
    src = model.state_dict()
    rules = _flux_rules(config)
    _check_keys(list(src), [k for r in rules for k in r.src], "mmdit_from_flux")
    ours = _build_meta(lambda: MMDiT(config, backend=backend))
    like = ours.state_dict()
    state = {r.dst: _to_fastdit(r, src, like[r.dst]) for r in rules}
    return _finish(ours, state, _source_training(model))


def flux_from_mmdit(model: MMDiT) -> nn.Module:
    """A diffusers ``FluxTransformer2DModel`` with the weights of a fastdit :class:`~fastdit.models.MMDiT`
    (config: :func:`flux_config_from_mmdit`)."""
    if not isinstance(model, MMDiT):
        raise ValueError(f"flux_from_mmdit: expected a fastdit MMDiT, got {type(model).__name__}")
    kwargs = flux_config_from_mmdit(model.config)
    cls = _diffusers_class("FluxTransformer2DModel")
    theirs = _build_meta(lambda: cls(**kwargs))
    like = theirs.state_dict()
    rules = _flux_rules(model.config)
    src = model.state_dict()
    _check_keys(list(src), [r.dst for r in rules], "flux_from_mmdit")
    state: Dict[str, Tensor] = {}
    for r in rules:
        state.update(zip(r.src, _from_fastdit(r, src[r.dst], [like[k] for k in r.src])))
    _check_keys(list(like), list(state), "flux_from_mmdit")
    return _finish(theirs, state, model.training)


__all__ = ["mmdit_from_sd3", "sd3_from_mmdit", "mmdit_from_flux", "flux_from_mmdit", "mmdit_config_from_sd3",
           "mmdit_config_from_flux", "sd3_config_from_mmdit", "flux_config_from_mmdit", "flux_pack", "flux_unpack",
           "flux_image_ids", "flux_text_ids"]
