"""Process-group set-up from torchrun's environment, and the few collectives the trainer needs."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``, and whether it runs under a
    process group (``enabled``) that ``init_distributed`` created (``owns_group``, so it destroys it)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available else ``cpu``; ``cuda`` -> ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda asked for, but CUDA is not available here")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {name!r} (auto, cpu, cuda)")


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or run as a single process when ``WORLD_SIZE`` is unset or 1.

    Backend: NCCL on CUDA, gloo on CPU. An already initialised default group is reused (and left alone
    at the end). ``timeout_s`` bounds every collective, so a peer that died makes the others fail
    instead of waiting forever.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local_rank, dev, enabled=True, owns_group=False)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad distributed environment: RANK={rank} WORLD_SIZE={world}")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistInfo(0, 1, local_rank, dev)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"WORLD_SIZE={world} but {name} is not set (launch with torchrun)")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local_rank, dev, enabled=True, owns_group=True)


def shutdown(info: DistInfo, sync: bool = False) -> None:
    """Destroy the process group if ``init_distributed`` created it. ``sync``: first a barrier, so that no rank
    tears its group down while a peer's last collective is still in flight (gloo's worker threads can then
    abort the process at exit); only after a clean finish, where every rank gets here (after an error a
    peer may never arrive, and a barrier would wait for the whole timeout)."""
    if info.owns_group and dist.is_initialized():
        if sync:
            barrier(info)
        dist.destroy_process_group()


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` without a group)."""
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()
