"""Small helpers shared by the trainer pieces: unwrapping wrapped models and clean state-dict keys."""
from __future__ import annotations

import sys
from typing import Dict, Mapping

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel and whole-model ``torch.compile`` wrappers.

    FSDP2's ``fully_shard`` and in-place ``Module.compile`` do not wrap, so they need no unwrapping.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_compiled_wrapper(model):
            model = model._orig_mod
        else:
            return model


def _is_compiled_wrapper(model: nn.Module) -> bool:
    # Only a process that imported torch._dynamo can hold an OptimizedModule; checking sys.modules
    # avoids importing the compiler stack (seconds) just to unwrap plain models.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def clean_key(key: str) -> str:
    """A state-dict key without wrapper prefixes: leading ``module.`` (DDP) and every ``_orig_mod.``
    segment (``torch.compile``), so checkpoints of wrapped and plain models are interchangeable."""
    parts = key.split(".")
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p != "_orig_mod")


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with ``clean_key`` applied to every key; raises if two keys collapse into one."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = clean_key(key)
        if new in out:
            raise ValueError(f"state dict keys {key!r} and another both become {new!r} without prefixes")
        out[new] = value
    return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and _is_dtensor(t) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)
