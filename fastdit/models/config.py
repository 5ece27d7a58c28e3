"""Model configs: typed dataclasses with a registry of named presets (as DiT's ``DiT_models`` and
gpt-fast's ``ModelArgs.from_name``), round-trippable through JSON for checkpoints."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Sequence, TypeVar

from fastdit.models.layers import Size2, to_size2

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass
class ModelConfig:
    """Base of the model configs. Subclasses are dataclasses and set ``PRESETS`` (name -> field
    values that differ from the defaults) and ``family`` (e.g. "DiT")."""

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {}
    family: ClassVar[str] = ""

    @classmethod
    def names(cls) -> list:
        """The registered preset names, in registry order."""
        return list(cls.PRESETS)

    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def _check_fields(cls, values: Mapping[str, Any], where: str) -> None:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{cls.__name__}.{where}: unknown field(s) {', '.join(unknown)}; "
                             f"valid fields: {', '.join(cls.field_names())}")

    @classmethod
    def from_name(cls: type[C], name: str, **overrides: Any) -> C:
        """The preset ``name`` (e.g. ``"DiT-XL/2"``) with any field overridden by keyword."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.family} config {name!r}; valid names: {', '.join(cls.names())}")
        cls._check_fields(overrides, "from_name")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Inverse of :meth:`to_dict` (e.g. after a JSON round trip, which turns tuples into lists)."""
        cls._check_fields(values, "from_dict")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """Plain field values (JSON-serialisable)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def replace(self: C, **changes: Any) -> C:
        self._check_fields(changes, "replace")
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class PatchModelConfig(ModelConfig):
    """Base of the configs of patchified image transformers (DiT, MMDiT): the checks and derived sizes
    their fields ``input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
    learn_sigma, frequency_embedding_size`` share. Subclasses call :meth:`_validate_common` first in
    ``__post_init__``."""

    POSITIVE_INTS: ClassVar[tuple] = ("patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                                      "frequency_embedding_size")

    def _validate_common(self, extra_ints: Sequence[str] = ()) -> None:
        name = type(self).__name__
        if not isinstance(self.input_size, int):
            self.input_size = to_size2(self.input_size, f"{name}.input_size")
        to_size2(self.input_size, f"{name}.input_size")
        for field in self.POSITIVE_INTS + tuple(extra_ints):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{name}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        h, w = to_size2(self.input_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"{name}: input_size {h}×{w} is not divisible by patch_size {self.patch_size}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"{name}.mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def grid_size(self) -> Size2:
        """Patch grid (rows, columns) of ``input_size``."""
        h, w = to_size2(self.input_size)
        return h // self.patch_size, w // self.patch_size
