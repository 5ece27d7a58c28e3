"""Data sources for the trainer: the ``StatefulDataset`` interface and its in-memory and synthetic
implementations (streaming loaders implement the same interface)."""
from fastdit.data.base import Batch, StatefulDataset, derive_seed
from fastdit.data.memory import TensorDictDataset
from fastdit.data.prefetch import Prefetcher
from fastdit.data.synthetic import SyntheticLatents

__all__ = ["Batch", "Prefetcher", "StatefulDataset", "TensorDictDataset", "SyntheticLatents", "derive_seed"]
