"""Run logging: a JSONL file, optional TensorBoard, throughput/MFU arithmetic, and PNG sample grids."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

import torch


class JsonlLogger:
    """Appends one JSON object per line to ``path``.

    Each record is written with a single ``os.write`` on an ``O_APPEND`` descriptor, so a process
    killed between records leaves only whole lines; readers should still skip a line that does not
    parse. Non-finite floats are written as ``null`` (JSON has no NaN).
    """

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: Dict[str, Any]) -> None:
        if self._fd is None:
            raise RuntimeError("JsonlLogger is closed")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        os.write(self._fd, (json.dumps(clean) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_jsonl(path: str) -> list:
    """Every record of a JSONL file that parses (a torn last line is skipped)."""
    out = []
    with open(path, "r", encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_jsonl(path: str, step: int) -> int:
    """Keep the records of a JSONL log up to ``step``, atomically (temp file + ``os.replace``); returns how
    many records were removed.

    Used on resume from checkpoint ``step``: the interrupted run logged steps after it that the resumed run
    logs again. Kept: records whose ``"step"`` is ``<= step`` (metrics and events alike), and records
    without a step that come before the first removed one. Torn (unparsable) lines are dropped."""
    kept, dropped, cut = [], 0, False
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            at = record.get("step") if isinstance(record, dict) else None
            if (isinstance(at, (int, float)) and at <= step) or (not isinstance(at, (int, float)) and not cut):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                cut = True
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return dropped


def open_tensorboard(log_dir: str, purge_step: Optional[int] = None):
    """A ``SummaryWriter`` if TensorBoard is installed, else ``None`` (it is an optional extra).
    ``purge_step``: on resume, TensorBoard hides events of this step and later written before the
    interruption."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


#: Peak dense bf16 TFLOP/s of one device, by a substring of ``torch.cuda.get_device_name``.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def known_peak_tflops(device: Any) -> Optional[float]:
    """The peak of ``KNOWN_PEAK_TFLOPS`` for a CUDA device whose name contains a key (H100, H200), else
    ``None``: MFU against a guessed peak would be meaningless (on CPU in particular)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        name = torch.cuda.get_device_name(device)
    except Exception:  # pragma: no cover - no usable driver
        return None
    for key, peak in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def throughput(*, steps: int, seconds: float, batch_size: int, world_size: int,
               flops_per_sample: Optional[float] = None, tokens_per_sample: Optional[int] = None,
               peak_tflops: Optional[float] = None) -> Dict[str, float]:
    """Rates over a logging interval of ``steps`` steps that took ``seconds`` of wall time.

    images_per_s counts the global batch (all ranks). ``tflops`` is achieved TFLOP/s *per device*
    (``flops_per_sample`` are true FLOPs of forward + backward for one sample) and ``mfu`` divides it by
    the per-device ``peak_tflops``; without a peak (``None``: unknown device) there is no ``mfu`` key.
    """
    if seconds <= 0 or steps <= 0:
        return {}
    images = steps * batch_size * world_size / seconds
    out = {"images_per_s": images, "step_time_s": seconds / steps}
    if tokens_per_sample:
        out["tokens_per_s"] = images * tokens_per_sample
    if flops_per_sample:
        tflops = images * flops_per_sample / world_size / 1e12
        out["tflops"] = tflops
        if peak_tflops:
            out["mfu"] = tflops / peak_tflops
    return out


def make_grid(images: torch.Tensor, rows: int, padding: int = 2) -> torch.Tensor:
    """Tile ``images`` ``(B, C, H, W)`` in [-1, 1] into one ``(H', W', C)`` uint8 image of ``rows`` rows
    (``ceil(B / rows)`` columns, filled row by row; empty cells and the ``padding`` gaps are black).
    Values outside [-1, 1] are clipped; C must be 1 (grey) or 3 (RGB)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    b, c, h, w = images.shape
    rows = min(rows, b)
    cols = math.ceil(b / rows)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid.permute(1, 2, 0).contiguous()


def save_image_grid(images: torch.Tensor, path: str, rows: int, padding: int = 2) -> None:
    """Write ``make_grid(images, rows, padding)`` as a PNG (atomically: temp file, then rename)."""
    from PIL import Image
    grid = make_grid(images, rows, padding).numpy()
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid, mode="L" if grid.shape[-1] == 1 else "RGB")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
