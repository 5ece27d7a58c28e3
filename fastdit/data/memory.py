"""In-memory tensors as an infinite, sharded, per-epoch-shuffled stream of batches."""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Iterator, Mapping, Optional

import numpy as np
import torch

from fastdit.data.base import Batch, StatefulDataset, _check_common, derive_seed


class TensorDictDataset(StatefulDataset):
    """Batches drawn from a dict of equally long tensors (``{"x": (N, C, H, W), "y": (N,)}``).

    Each epoch every rank computes the same permutation of ``0..N-1`` from a generator seeded with
    ``(seed, epoch)`` (``arange`` when ``shuffle=False``) and takes its own contiguous block of
    ``N // world_size`` of it, so ranks see disjoint samples and equally many of them. The last
    ``N % world_size`` positions of each epoch's permutation are left out (different samples each epoch
    when shuffling). A batch that reaches the end of a rank's shard continues into the next epoch, so
    iteration is infinite and no sample is dropped by batching.

    State: ``epoch`` and ``index`` (position inside this rank's shard of that epoch). The permutation is
    recomputed from ``(seed, epoch)``, which is all the RNG this dataset owns.

    Batches are views gathered with ``index_select`` from the stored tensors (on their device).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        _check_common(batch_size, rank, world_size, seed)
        if not tensors:
            raise ValueError("tensors must hold at least one tensor")
        lengths = {k: (v.shape[0] if v.dim() else None) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"every tensor needs the same first dimension, got {lengths}")
        self.tensors = dict(tensors)
        self.num_samples = next(iter(lengths.values()))
        if self.num_samples < world_size:
            raise ValueError(f"{self.num_samples} samples cannot be sharded over {world_size} ranks")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle = shuffle
        self.shard_size = self.num_samples // world_size
        self.epoch, self.index = 0, 0
        self._perm_epoch: Optional[int] = None
        self._shard: Optional[torch.Tensor] = None

    def shard_indices(self, epoch: int) -> torch.Tensor:
        """The sample indices this rank reads in ``epoch``, in order."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
                perm = torch.randperm(self.num_samples, generator=gen)
            else:
                perm = torch.arange(self.num_samples)
            start = self.rank * self.shard_size
            self._shard, self._perm_epoch = perm[start:start + self.shard_size], epoch
        return self._shard

    def next_indices(self) -> torch.Tensor:
        """Indices of the next batch; advances the position."""
        parts, need = [], self.batch_size
        while need:
            shard = self.shard_indices(self.epoch)
            take = min(need, self.shard_size - self.index)
            parts.append(shard[self.index:self.index + take])
            self.index += take
            need -= take
            if self.index == self.shard_size:
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(parts)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            idx = self.next_indices()
            yield {k: v.index_select(0, idx.to(v.device)) for k, v in self.tensors.items()}

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": type(self).__name__, "epoch": self.epoch, "index": self.index, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "num_samples": self.num_samples,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._check_state(state, ("seed", "rank", "world_size", "num_samples", "shuffle"))
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.shard_size:
            raise ValueError(f"TensorDictDataset.load_state_dict: bad position epoch={epoch} index={index}")
        self.epoch, self.index = epoch, index


def load_tensor_file(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` (``torch.load(weights_only=True, mmap=True)``: a dict of tensors, memory-mapped)
    or ``.npz`` file (no pickles; read into memory: a zip cannot be mapped). ``ValueError`` naming the file
    for a missing file, another extension, or other contents."""
    if not os.path.isfile(path):
        raise ValueError(f"data.path: no file at {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        try:
            try:  # memory-mapped: pages are read as batches touch them, and every rank shares the page cache
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # (files in torch's legacy format cannot be mapped: read them)
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(f"data.path: {path} is not a tensor file or holds an unsafe pickle "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
            raise ValueError(f"data.path: {path} must hold a dict of tensors")
        return dict(data)
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {k: torch.from_numpy(np.ascontiguousarray(archive[k])) for k in archive.files}
    raise ValueError(f"data.path: {path} is neither a .pt nor an .npz file")
