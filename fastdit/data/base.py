"""The dataset interface the trainer consumes: an infinite, rank-sharded, resumable stream of batches.

A ``StatefulDataset`` yields batches (``dict[str, Tensor]``, every tensor with the per-rank batch size as
its first dimension) forever. Three promises make exact, hang-free distributed training possible:

* **Sharded.** Each rank sees its own part of the data, chosen from ``rank`` and ``world_size``.
* **Deterministic.** The sequence of batches a rank yields is a function of ``(seed, rank, world_size)``
  and the dataset contents only: no global RNG is touched.
* **Resumable.** ``state_dict()`` captures the exact position after the last batch handed out (plus any
  RNG the dataset owns); ``load_state_dict()`` on a fresh instance continues with the very next batch.

Iteration never ends, so every rank can take exactly as many batches as the trainer asks for
(``max_steps``): uneven amounts of data per rank cannot leave one rank waiting in a collective for a
peer that ran out of batches. Epochs are an internal detail of each implementation.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Iterator

import numpy as np
import torch

Batch = Dict[str, torch.Tensor]


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integer parts (seed, rank, epoch, step, ...).

    NumPy's SeedSequence hashes the parts, so nearby inputs (seed 0 rank 1 vs seed 1 rank 0) give
    unrelated streams; the result seeds a ``torch.Generator``.
    """
    if any(int(p) < 0 for p in parts):
        raise ValueError(f"seed parts must be non-negative, got {parts}")
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


class StatefulDataset(abc.ABC):
    """Abstract base of the trainer's data sources (see the module docstring for the contract).

    Subclasses set ``batch_size`` (per rank), ``rank``, ``world_size`` and ``seed`` and implement
    ``__iter__`` (continuing from the current position and advancing it as batches are handed out),
    ``state_dict`` and ``load_state_dict``. The state holds only plain Python values and tensors so a
    checkpoint can be read with ``torch.load(..., weights_only=True)``.

    Note: the state describes batches *handed out*. A consumer that prefetches must track what it
    actually used: :class:`fastdit.data.Prefetcher` (the trainer's) pairs every batch with the state
    after it.
    """

    batch_size: int
    rank: int
    world_size: int
    seed: int

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """Infinite iterator of batches, starting at the current position."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """The exact position after the last batch handed out (plain values only)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state`` (as returned by ``state_dict`` of an instance with the same
        construction arguments); raises ``ValueError`` when the state belongs to another setup."""

    def _check_state(self, state: Dict[str, Any], keys: tuple) -> None:
        """Reject a state written by another dataset kind or for another rank / world size / seed."""
        kind = type(self).__name__
        if state.get("kind") != kind:
            raise ValueError(f"{kind}.load_state_dict: state is for {state.get('kind')!r}")
        for key in keys:
            if state.get(key) != getattr(self, key):
                raise ValueError(f"{kind}.load_state_dict: state has {key}={state.get(key)!r}, "
                                 f"this dataset has {key}={getattr(self, key)!r}")


def _check_common(batch_size: int, rank: int, world_size: int, seed: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
