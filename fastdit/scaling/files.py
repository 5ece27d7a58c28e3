"""The files of a study folder and how they are written: its layout (``points/<size>_s<steps>/result.json``,
``data/``, ``scaling.json``, ``scaling.png``) and atomic JSON and tensor writes (a reader sees the old file or
the new one, never part of one)."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

import torch

RESULT_FILE = "result.json"
REPORT_FILE = "scaling.json"
PLOT_FILE = "scaling.png"
DATA_DIR = "data"
POINTS_DIR = "points"


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and rename: readers see the old or the new file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, allow_nan=False, default=json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def json_default(value: Any) -> Any:
    """What ``json.dump`` cannot write itself: tuples as lists, tensor and NumPy scalars as numbers."""
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_or_none(value: Optional[float]) -> Optional[float]:
    """``value`` as a float, None when it is None or not finite (the JSON files hold no NaN)."""
    return float(value) if value is not None and math.isfinite(value) else None


def save_tensors_atomic(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(tensors, tmp)
    os.replace(tmp, path)

