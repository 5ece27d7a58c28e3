"""Model configs: typed dataclasses with a registry of named presets (as DiT's ``DiT_models`` and
gpt-fast's ``ModelArgs.from_name``), round-trippable through JSON for checkpoints."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, TypeVar

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
