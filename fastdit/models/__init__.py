"""Models built from fastdit's modules: DiT (class-conditional, official checkpoint layout) and
MMDiT (caption-conditional, symmetric joint attention), with named presets and FLOP counts.

    from fastdit.models import create_model
    model = create_model("DiT-XL/2")                     # any name in model_names()
    model = create_model("MMDiT-Tiny/2", caption_dim=64, backend="reference")
"""
from typing import Optional, Union

from fastdit.models.config import ModelConfig
from fastdit.models.dit import DiT, DiTConfig
from fastdit.models.flops import (dit_flop_breakdown, dit_flops, mmdit_flop_breakdown, mmdit_flops,
                                  training_flops)
from fastdit.models.mmdit import MMDiT, MMDiTConfig, trim_caption_padding

_FAMILIES = ((DiTConfig, DiT), (MMDiTConfig, MMDiT))


def model_names() -> list:
    """Every registered preset name, DiT's then MMDiT's."""
    return [name for config_cls, _ in _FAMILIES for name in config_cls.names()]


def config_from_name(name: str, **overrides) -> Union[DiTConfig, MMDiTConfig]:
    """The config of a named preset (``"DiT-XL/2"``, ``"MMDiT-S/2"``, …) with fields overridden."""
    for config_cls, _ in _FAMILIES:
        if name in config_cls.PRESETS:
            return config_cls.from_name(name, **overrides)
    raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(model_names())}")


def create_model(name_or_config: Union[str, DiTConfig, MMDiTConfig], *, backend: Optional[str] = None,
                 **overrides) -> Union[DiT, MMDiT]:
    """Build a model from a preset name (fields overridable by keyword) or a config object."""
    if isinstance(name_or_config, str):
        config = config_from_name(name_or_config, **overrides)
    elif overrides:
        config = name_or_config.replace(**overrides)
    else:
        config = name_or_config
    for config_cls, model_cls in _FAMILIES:
        if isinstance(config, config_cls):
            return model_cls(config, backend=backend)
    raise ValueError(f"create_model: expected a model name or a DiTConfig / MMDiTConfig, "
                     f"got {type(name_or_config).__name__}")


__all__ = ["DiT", "DiTConfig", "MMDiT", "MMDiTConfig", "ModelConfig", "create_model", "config_from_name",
           "model_names", "dit_flops", "dit_flop_breakdown", "mmdit_flops", "mmdit_flop_breakdown",
           "training_flops", "trim_caption_padding"]
