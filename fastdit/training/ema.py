"""Exponential moving average of model weights, kept in fp32 outside the optimizer."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

import torch
from torch import nn

from fastdit.training.utils import _is_dtensor, clean_key, local_tensor, unwrap_model


class EMA:
    """fp32 shadow copies of a model's floating-point parameters.

    ``update()`` (after each optimizer step) does ``shadow = d * shadow + (1 - d) * param`` for all
    parameters at once with ``torch._foreach_lerp_`` (``lerp(shadow, param, 1 - d)``), where the decay
    of update ``n`` (0-based count of updates so far) is ``min(decay, (1 + n) / (10 + n))`` with
    ``warmup`` and ``decay`` without. Parameters with ``requires_grad=False`` are tracked too (a constant
    stays bitwise constant under lerp); buffers are not averaged (the model's own are used).

    Wrappers: DDP and whole-model ``torch.compile`` are unwrapped, in-place ``Module.compile`` and FSDP2
    keep the parameters, so EMA names are the model's clean state-dict names. With FSDP2 the shadow holds
    this rank's shard only; ``state_dict`` and ``load_state_dict`` are then collective (all ranks call).
    Build the EMA *after* sharding/wrapping, since FSDP2 replaces parameters.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self.names: List[str] = []
        self.params: List[torch.Tensor] = []
        for name, p in unwrap_model(model).named_parameters():
            if p.is_floating_point():
                self.names.append(clean_key(name))
                self.params.append(p)
        with torch.no_grad():
            self.shadow = [local_tensor(p).detach().to(torch.float32, copy=True) for p in self.params]
        # fp32 parameters feed the foreach lerp directly; others are upcast per update
        self._fp32 = [i for i, p in enumerate(self.params) if p.dtype == torch.float32]
        self._other = [i for i, p in enumerate(self.params) if p.dtype != torch.float32]

    def current_decay(self) -> float:
        """The decay the next ``update()`` uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow towards the current parameters (one EMA step)."""
        weight = 1.0 - self.current_decay()
        for idx, upcast in ((self._fp32, False), (self._other, True)):
            if not idx:
                continue
            shadows = [self.shadow[i] for i in idx]
            params = [local_tensor(self.params[i].detach()) for i in idx]
            if upcast:
                params = [p.float() for p in params]
            torch._foreach_lerp_(shadows, params, weight)
        self.num_updates += 1

    @contextlib.contextmanager
    def swap(self) -> Iterator[None]:
        """Run the body with the EMA weights in the model (cast to each parameter's dtype); the
        training weights come back bitwise on exit, exceptions included. Use for sampling/eval."""
        with torch.no_grad():
            backup = [local_tensor(p.detach()).clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                local_tensor(p.detach()).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    local_tensor(p.detach()).copy_(b)

    def state_dict(self) -> Dict[str, Any]:
        """``{"decay", "warmup", "num_updates", "shadow": {name: full fp32 CPU tensor}}``."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {n: _full(s, p).cpu() for n, s, p in zip(self.names, self.shadow, self.params)}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state (names must match the model's, wrapper prefixes aside; shapes too)."""
        shadow = {clean_key(k): v for k, v in state["shadow"].items()}
        missing = sorted(set(self.names) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.names))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, s, p in zip(self.names, self.shadow, self.params):
                full = shadow[name]
                if tuple(full.shape) != tuple(p.shape):
                    raise ValueError(f"EMA state {name}: shape {tuple(full.shape)}, model {tuple(p.shape)}")
                s.copy_(_shard_like(full, p))
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])


def _full(shadow: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) shadow; collective for DTensor parameters."""
    if not _is_dtensor(param):
        return shadow.detach().clone()
    from torch.distributed.tensor import DTensor
    dt = DTensor.from_local(shadow, param.device_mesh, param.placements, run_check=False,
                            shape=param.shape, stride=param.stride())
    return dt.full_tensor()


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` laid out like ``param`` (``full`` itself for plain tensors)."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor
    local = local_tensor(param)
    dt = distribute_tensor(full.to(device=local.device, dtype=torch.float32), param.device_mesh,
                           param.placements, src_data_rank=None)  # every rank holds full: no comm
    return dt.to_local()
