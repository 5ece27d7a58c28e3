"""Exact weight converters between diffusers' ``DiTTransformer2DModel`` and fastdit's :class:`~fastdit.models.DiT`
(whose state dict is the official facebookresearch/DiT layout).

    from fastdit.integrations.diffusers.convert_dit import dit_from_diffusers, diffusers_from_dit
    dit = dit_from_diffusers(DiTTransformer2DModel.from_pretrained("facebook/DiT-XL-2-256", subfolder="transformer"))
    out = dit(x, t, y)                                   # == transformer(x, t, y).sample (eval mode)

Calling conventions (same inputs, same output):

- diffusers: ``model(hidden_states, timestep, class_labels).sample``: hidden_states (B, C, H, W), timestep (B,)
  (1-D only), class_labels (B,) long, output (B, C_out, H, W);
- fastdit: ``model(x, t, y)`` with the same three tensors (t may also be a scalar), output (B, C_out, H, W).
  With learned sigma (``out_channels == 2 * in_channels`` in diffusers, ``learn_sigma`` in fastdit) the first C
  output channels are the prediction and the last C the variance interpolation, in both. The null class
  (classifier-free guidance) is label ``num_classes`` in both.

What diffusers' port does differently from the official DiT, and how the conversion handles it:

1. Timestep embedding: diffusers uses ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``, i.e.
   frequencies ``exp(-ln(10000) * k / (128 - 1))``; the official DiT divides by 128. The converted fastdit
   model gets ``DiTConfig.timestep_freq_shift = 1``. A fastdit model with shift 0 (the official one) has no
   exact diffusers equivalent: :func:`diffusers_from_dit` refuses it unless ``allow_inexact=True`` (what
   diffusers' own conversion script of the official checkpoints did: the same weights under shifted
   frequencies).
2. The LayerNorm before each block's MLP is ``nn.LayerNorm(dim, norm_eps)`` with diffusers' config
   ``norm_eps`` (default 1e-5); the official one and fastdit's default use 1e-6 (the attention-side norm
   and the final norm are 1e-6 in both). The converted model gets ``DiTConfig.mlp_norm_eps = norm_eps``.
3. Every diffusers block holds its own copy of the timestep + label embedder
   (``transformer_blocks.{i}.norm1.emb``); block i uses its copy, the final layer uses block 0's. fastdit has
   one shared ``t_embedder`` / ``y_embedder``: :func:`dit_from_diffusers` takes block 0's and raises a
   ValueError naming the first block and tensor that differ (pretrained checkpoints hold identical copies);
   :func:`diffusers_from_dit` writes the copy into every block.
4. In training mode with label dropout, each diffusers block (and the final layer) draws its own dropout
   mask, so one sample can be unconditional in one block and conditional in another; fastdit (and the
   official DiT) draws once per forward. Eval-mode outputs are equal; training-mode ones are not.
5. diffusers computes the sinusoidal timestep embedding in float32 whatever the model's dtype (then casts it to
   the hidden dtype); fastdit does the same except for float64 models, which embed in float64. In float32,
   bfloat16 and float16 the two embeddings are bitwise equal; a float64 diffusers model carries float32
   rounding (~1e-7 relative) in its timestep embedding.
6. Position table: at the configured ``sample_size`` diffusers' table equals fastdit's ``sincos_2d`` (same
   float32 values; it is not in diffusers' state dict, but is recomputed). At another input size diffusers
   rescales positions to the configured grid (``arange(n) * base / n``, base = sample_size / patch_size,
   ``interpolation_scale`` 1) while fastdit and the official DiT use integer positions ``arange(n)``; and
   diffusers' unpatchify assumes a square output. Outputs therefore agree only at the configured size.
7. Dropout: diffusers' ``dropout`` config applies dropout inside attention and MLP in training; fastdit's DiT
   has none (refused unless ``ignore_dropout=True``; eval outputs are equal either way).

Weight mapping (diffusers -> fastdit): ``pos_embed.proj`` -> ``x_embedder.proj``; block 0's
``norm1.emb.timestep_embedder.linear_{1,2}`` -> ``t_embedder.mlp.{0,2}``; ``norm1.emb.class_embedder.embedding_table``
(with the null row: diffusers always has ``class_dropout_prob`` 0.1) -> ``y_embedder.embedding_table``;
``norm1.linear`` -> ``adaLN_modulation.1`` (same chunk order: shift, scale, gate of attention, then of the
MLP); ``attn1.to_{q,k,v}`` -> ``attn.qkv`` (concatenated along the output features); ``attn1.to_out.0`` ->
``attn.proj``; ``ff.net.0.proj`` -> ``mlp.fc1``; ``ff.net.2`` -> ``mlp.fc2``; ``proj_out_1`` ->
``final_layer.adaLN_modulation.1`` (shift then scale in both); ``proj_out_2`` -> ``final_layer.linear``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from fastdit.models.dit import DiT, DiTConfig
from fastdit.models.layers import sincos_2d, to_size2

# diffusers' CombinedTimestepLabelEmbeddings: fixed in its code, not in the config
DIFFUSERS_CLASS_DROPOUT_PROB = 0.1
DIFFUSERS_FREQUENCY_EMBEDDING_SIZE = 256
DIFFUSERS_TIMESTEP_FREQ_SHIFT = 1.0
DIFFUSERS_MLP_RATIO = 4.0

# config fields of DiTTransformer2DModel that have no effect on a DiT (norm_num_groups is unused there)
_IGNORED_FIELDS = ("norm_num_groups",)
_KNOWN_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "dropout",
                 "attention_bias", "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm",
                 "upcast_attention", "norm_type", "norm_elementwise_affine", "norm_eps") + _IGNORED_FIELDS

_EMB = "norm1.emb."
_BLOCK_KEYS = {  # fastdit block key -> diffusers block key(s)
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_EMBEDDER_KEYS = {  # fastdit key -> diffusers key under transformer_blocks.{i}.norm1.emb.
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
}
_TOP_KEYS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}


def _diffusers_dit_class():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as err:  # pragma: no cover - environment problem
        raise ImportError(f"the DiT converters need diffusers (pip install diffusers): {err}") from err
    return DiTTransformer2DModel


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def dit_config_from_diffusers(config: Any, *, ignore_dropout: bool = False) -> DiTConfig:
    """The :class:`~fastdit.models.DiTConfig` of a diffusers ``DiTTransformer2DModel`` config (its ``.config``,
    a plain mapping of the same fields, or the model itself), with ``timestep_freq_shift = 1``,
    ``mlp_norm_eps = norm_eps`` and ``class_dropout_prob = 0.1`` (diffusers' fixed values; see the module
    docstring).

    Raises ValueError naming the field for what fastdit's DiT cannot reproduce exactly: ``norm_type`` other
    than "ada_norm_zero"; ``num_embeds_ada_norm`` not a class count (a positive int); ``activation_fn`` other
    than "gelu-approximate"; ``attention_bias`` False; ``upcast_attention``; ``norm_elementwise_affine``;
    ``out_channels`` neither in_channels nor 2 × in_channels; ``dropout`` > 0 (unless ``ignore_dropout``:
    fastdit's DiT has no dropout, eval outputs are equal); fields this converter does not know.
    """
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    if not isinstance(config, Mapping):
        raise ValueError(f"dit_config_from_diffusers: expected a DiTTransformer2DModel config (a mapping) or "
                         f"model, got {type(config).__name__}")
    defaults = _diffusers_defaults()
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(_KNOWN_FIELDS))
    if unknown:
        raise ValueError(f"diffusers DiT config: unknown field(s) {', '.join(unknown)}; the converter knows "
                         f"{', '.join(_KNOWN_FIELDS)} (a newer diffusers may mean something this conversion misses)")
    cfg = {**defaults, **values}

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"diffusers DiT config: {field}={cfg[field]!r} is not supported: {why}")

    if cfg["norm_type"] != "ada_norm_zero":
        raise bad("norm_type", "fastdit's DiT is the AdaLN-Zero DiT (norm_type='ada_norm_zero')")
    if not _is_positive_int(cfg["num_embeds_ada_norm"]):
        raise bad("num_embeds_ada_norm", "it must be the number of classes (a positive int)")
    if cfg["activation_fn"] != "gelu-approximate":
        raise bad("activation_fn", "fastdit's MLP is GELU with the tanh approximation ('gelu-approximate')")
    if cfg["attention_bias"] is not True:
        raise bad("attention_bias", "fastdit's attention has q, k, v biases (attention_bias=True)")
    if cfg["upcast_attention"]:
        raise bad("upcast_attention", "fastdit's attention does not upcast")
    if cfg["norm_elementwise_affine"]:
        raise bad("norm_elementwise_affine", "fastdit's LayerNorms have no affine parameters")
    if not (_is_number(cfg["dropout"]) and 0 <= cfg["dropout"] < 1):
        raise bad("dropout", "must be a probability")
    if cfg["dropout"] > 0 and not ignore_dropout:
        raise bad("dropout", "fastdit's DiT has no dropout (eval outputs would be equal: pass ignore_dropout=True "
                  "to convert anyway)")
    if not (_is_number(cfg["norm_eps"]) and cfg["norm_eps"] > 0):
        raise bad("norm_eps", "must be a positive number")
    for field in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size",
                  "patch_size"):
        if not _is_positive_int(cfg[field]):
            raise bad(field, "must be a positive int")
    c_in, c_out = cfg["in_channels"], cfg["out_channels"]
    if c_out is None:
        c_out = c_in
    if c_out not in (c_in, 2 * c_in) or isinstance(c_out, bool):
        raise bad("out_channels", f"fastdit's DiT outputs in_channels ({c_in}) or 2 × in_channels "
                  f"({2 * c_in}, learned sigma) channels")
    try:
        return DiTConfig(input_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=c_in,
                         hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"], depth=cfg["num_layers"],
                         num_heads=cfg["num_attention_heads"], mlp_ratio=DIFFUSERS_MLP_RATIO,
                         class_dropout_prob=DIFFUSERS_CLASS_DROPOUT_PROB, num_classes=cfg["num_embeds_ada_norm"],
                         learn_sigma=c_out == 2 * c_in, frequency_embedding_size=DIFFUSERS_FREQUENCY_EMBEDDING_SIZE,
                         timestep_freq_shift=DIFFUSERS_TIMESTEP_FREQ_SHIFT, mlp_norm_eps=float(cfg["norm_eps"]))
    except ValueError as err:
        raise ValueError(f"diffusers DiT config {dict(values)} has no fastdit DiTConfig: {err}") from err


def _diffusers_defaults() -> Dict[str, Any]:
    import inspect

    params = inspect.signature(_diffusers_dit_class().__init__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def diffusers_config_from_dit(config: DiTConfig, *, allow_inexact: bool = False) -> Dict[str, Any]:
    """The ``DiTTransformer2DModel(**kwargs)`` arguments of a :class:`~fastdit.models.DiTConfig`.

    Raises ValueError naming the field for what diffusers' DiT cannot hold: a non-square ``input_size``,
    ``mlp_ratio`` other than 4, ``frequency_embedding_size`` other than 256, ``class_dropout_prob`` 0 (diffusers
    always has the null class), ``timestep_freq_shift`` other than 1 (the official DiT's 0 included) unless
    ``allow_inexact`` (see the module docstring, item 1).
    """
    if not isinstance(config, DiTConfig):
        raise ValueError(f"diffusers_config_from_dit: expected a DiTConfig, got {type(config).__name__}")

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"DiTConfig.{field}={getattr(config, field)!r} has no diffusers equivalent: {why}")

    h, w = to_size2(config.input_size)
    if h != w:
        raise bad("input_size", "diffusers' DiT is square (one sample_size)")
    if config.mlp_ratio != DIFFUSERS_MLP_RATIO:
        raise bad("mlp_ratio", "diffusers' DiT has a 4 × hidden MLP")
    if config.frequency_embedding_size != DIFFUSERS_FREQUENCY_EMBEDDING_SIZE:
        raise bad("frequency_embedding_size", "diffusers' DiT embeds timesteps with 256 frequencies")
    if config.class_dropout_prob <= 0:
        raise bad("class_dropout_prob", "diffusers' label table always has the null-class row (dropout 0.1)")
    if config.timestep_freq_shift != DIFFUSERS_TIMESTEP_FREQ_SHIFT and not allow_inexact:
        raise bad("timestep_freq_shift", "diffusers' DiT embeds timesteps with downscale_freq_shift=1 (frequencies "
                  "10000**(-k/127)); a model trained with another shift (the official DiT: 0) gives other outputs "
                  "there. Pass allow_inexact=True to convert the weights anyway")
    return dict(num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
                in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
                dropout=0.0, attention_bias=True, sample_size=h, patch_size=config.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=config.num_classes, upcast_attention=False,
                norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=float(config.mlp_norm_eps))


def _check_shared_embedders(state: Mapping[str, Tensor], depth: int) -> None:
    prefix0 = f"transformer_blocks.0.{_EMB}"
    names = [k[len(prefix0):] for k in state if k.startswith(prefix0)]
    for i in range(1, depth):
        for name in names:
            key = f"transformer_blocks.{i}.{_EMB}{name}"
            if key not in state:
                raise ValueError(f"diffusers DiT: block {i} has no {key} (block 0 has its {name})")
            if not torch.equal(state[key], state[prefix0 + name]):
                raise ValueError(
                    f"diffusers DiT: block {i}'s timestep/label embedder differs from block 0's at {key} (first "
                    f"difference); fastdit's DiT shares one embedder, so every block's copy "
                    f"(transformer_blocks.*.norm1.emb) must be equal. Pretrained checkpoints have equal copies; "
                    f"tie them (copy block 0's) to convert a model that does not")


def _assign(model: nn.Module, state: Dict[str, Tensor]) -> None:
    """Load ``state`` (fresh tensors) into ``model`` by assignment (keeps their dtypes and devices), strict."""
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"conversion left tensors unset: {', '.join(left)}")


def _source_tensor(state: Mapping[str, Tensor], key: str) -> Tensor:
    return state[key].detach().clone()


def dit_from_diffusers(model: nn.Module, *, backend: Optional[str] = None, ignore_dropout: bool = False) -> DiT:
    """A fastdit :class:`~fastdit.models.DiT` computing what a diffusers ``DiTTransformer2DModel`` computes.

    ``dit(x, t, y)`` equals ``model(x, t, y).sample`` in eval mode at the configured sample size, to rounding
    (the differences of diffusers' port from the official DiT are carried over through
    ``DiTConfig.timestep_freq_shift`` and ``mlp_norm_eps``; see the module docstring for all of them). Tensors
    are copied (no sharing) and keep their dtypes and devices; the new model is in the source's train/eval
    mode. ``backend`` goes to fastdit's modules.

    Raises ValueError for configs fastdit cannot reproduce (see :func:`dit_config_from_diffusers`), when the
    per-block timestep/label embedder copies differ (naming the first block and tensor), or when the state dict
    has keys outside the DiT layout (e.g. fused QKV projections: call ``unfuse_qkv_projections()`` first).
    """
    config = dit_config_from_diffusers(model.config, ignore_dropout=ignore_dropout)
    state = model.state_dict()
    _check_shared_embedders(state, config.depth)

    emb0 = f"transformer_blocks.0.{_EMB}"
    out: Dict[str, Tensor] = {}
    # every block's embedder copy is accounted for (checked equal to block 0's above)
    used = {k for k in state if k.startswith("transformer_blocks.") and f".{_EMB}" in k}

    def take(dst: str, src: str, suffixes=("weight", "bias")) -> None:
        for suffix in suffixes:
            out[f"{dst}.{suffix}"] = _source_tensor(state, f"{src}.{suffix}")
            used.add(f"{src}.{suffix}")

    for dst, src in _TOP_KEYS.items():
        take(dst, src)
    for dst, src in _EMBEDDER_KEYS.items():
        take(dst, emb0 + src)
    take("y_embedder.embedding_table", emb0 + "class_embedder.embedding_table", ("weight",))
    for i in range(config.depth):
        src = f"transformer_blocks.{i}."
        for dst_name, src_name in _BLOCK_KEYS.items():
            take(f"blocks.{i}.{dst_name}", src + src_name)
        for suffix in ("weight", "bias"):  # fastdit's qkv features are (3, heads, head_dim): [q; k; v]
            names = [f"{src}attn1.to_{n}.{suffix}" for n in "qkv"]
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([state[n].detach() for n in names], dim=0)
            used.update(names)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"diffusers DiT: state-dict keys outside the DiT layout: {', '.join(extra[:6])}"
                         f"{' …' if len(extra) > 6 else ''} (fused QKV projections? call unfuse_qkv_projections())")

    # the fixed position table is not in diffusers' state dict; check it is fastdit's before using fastdit's
    table = sincos_2d(config.hidden_size, *config.grid_size).float().unsqueeze(0)
    theirs = getattr(getattr(model, "pos_embed", None), "pos_embed", None)
    if isinstance(theirs, Tensor) and not theirs.is_meta:
        if theirs.shape != table.shape or not torch.equal(theirs.detach().cpu(), table.to(theirs.dtype)):
            raise ValueError("diffusers DiT: pos_embed.pos_embed is not the 2-D sin-cos table of the configured "
                             "grid (modified, or a diffusers version with another table)")
        out["pos_embed"] = table.to(device=theirs.device, dtype=theirs.dtype)
    else:
        ref = out["x_embedder.proj.weight"]
        out["pos_embed"] = table.to(device=ref.device, dtype=ref.dtype)

    with torch.device("meta"):
        dit = DiT(config, backend=backend)
    _assign(dit, out)
    return dit.train(model.training)


def diffusers_from_dit(model: DiT, *, allow_inexact: bool = False):
    """A diffusers ``DiTTransformer2DModel`` computing what a fastdit :class:`~fastdit.models.DiT` computes.

    ``out(x, t, y).sample`` equals ``model(x, t, y)`` in eval mode at the configured input size, to rounding.
    The shared timestep/label embedder is copied into every block's ``norm1.emb``. Tensors are copied and keep
    their dtypes and devices; the new model is in the source's train/eval mode.

    Raises ValueError naming the field for configs diffusers cannot hold (see
    :func:`diffusers_config_from_dit`), including the official DiT's timestep frequencies
    (``timestep_freq_shift`` 0) unless ``allow_inexact=True``. A ``class_dropout_prob`` other than diffusers'
    fixed 0.1 is set on the returned model's label embedders (same training behaviour) with a warning: diffusers'
    config cannot record it, so a saved and reloaded copy trains with 0.1.
    """
    if not isinstance(model, DiT):
        raise ValueError(f"diffusers_from_dit: expected a fastdit DiT, got {type(model).__name__}")
    config = model.config
    kwargs = diffusers_config_from_dit(config, allow_inexact=allow_inexact)
    state = model.state_dict()
    D = config.hidden_size
    out: Dict[str, Tensor] = {}

    def put(dst: str, src: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = _source_tensor(state, f"{src}.{suffix}")

    for src, dst in _TOP_KEYS.items():
        put(dst, src)
    for i in range(config.depth):
        dst = f"transformer_blocks.{i}."
        for src_name, dst_name in _EMBEDDER_KEYS.items():
            put(dst + _EMB + dst_name, src_name)
        out[dst + _EMB + "class_embedder.embedding_table.weight"] = _source_tensor(
            state, "y_embedder.embedding_table.weight")
        for src_name, dst_name in _BLOCK_KEYS.items():
            put(dst + dst_name, f"blocks.{i}.{src_name}")
        for suffix in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{suffix}"].detach().split(D, dim=0)
            for name, part in zip("qkv", (q, k, v)):
                out[f"{dst}attn1.to_{name}.{suffix}"] = part.clone()

    cls = _diffusers_dit_class()
    with torch.device("meta"):
        result = cls(**kwargs)
    _assign_diffusers(result, out, model.pos_embed)
    if config.class_dropout_prob != DIFFUSERS_CLASS_DROPOUT_PROB:
        warnings.warn(f"diffusers_from_dit: class_dropout_prob {config.class_dropout_prob} is set on the returned "
                      f"model's label embedders, but diffusers' config cannot hold it (reloaded, it trains with "
                      f"{DIFFUSERS_CLASS_DROPOUT_PROB}); inference is unaffected", stacklevel=2)
        for block in result.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = config.class_dropout_prob
    return result.train(model.training)


def _assign_diffusers(result: nn.Module, state: Dict[str, Tensor], like: Tensor) -> None:
    result.load_state_dict(state, strict=True, assign=True)
    # pos_embed.pos_embed is a non-persistent buffer: recompute it as diffusers' PatchEmbed does, off the meta
    # device, in the dtype and on the device of the fastdit model's table
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    patch = result.pos_embed
    table = get_2d_sincos_pos_embed(patch.pos_embed.shape[-1], (patch.height, patch.width), base_size=patch.base_size,
                                    interpolation_scale=patch.interpolation_scale, output_type="pt")
    patch.pos_embed = table.float().unsqueeze(0).to(device=like.device, dtype=like.dtype)
    left = [n for n, t in list(result.named_parameters()) + list(result.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"conversion left tensors unset: {', '.join(left)}")
