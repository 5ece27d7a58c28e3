"""Synthetic latents: random tensors and labels, for smoke tests and throughput measurements."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Sequence

import torch

from fastdit.data.base import Batch, StatefulDataset, _check_common, derive_seed


class SyntheticLatents(StatefulDataset):
    """Infinite batches ``{"x": (B, *shape) float, "y": (B,) int64}`` of standard-normal latents and
    uniform labels in ``[0, num_classes)`` (no ``"y"`` when ``num_classes == 0``).

    Batch ``step`` (0-based) of rank ``rank`` comes from a generator seeded with ``(seed, rank, step)``:
    deterministic, different on every rank, and independent of how many batches were drawn before, so
    the state is just ``step``.
    """

    def __init__(self, shape: Sequence[int], batch_size: int, *, num_classes: int = 1000, seed: int = 0,
                 rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32):
        _check_common(batch_size, rank, world_size, seed)
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or any(s < 1 for s in self.shape):
            raise ValueError(f"shape must be non-empty positive sizes, got {tuple(shape)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_classes, self.dtype = num_classes, dtype
        self.step = 0

    def batch_at(self, step: int) -> Batch:
        """The batch this rank yields at position ``step`` (pure function of seed, rank, step)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, step))
        batch = {"x": torch.randn((self.batch_size, *self.shape), generator=gen).to(self.dtype)}
        if self.num_classes:
            batch["y"] = torch.randint(0, self.num_classes, (self.batch_size,), generator=gen)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.batch_at(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": type(self).__name__, "step": self.step, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._check_state(state, ("seed", "rank", "world_size"))
        if int(state["step"]) < 0:
            raise ValueError(f"SyntheticLatents.load_state_dict: bad step {state['step']}")
        self.step = int(state["step"])
