"""Data sources for the trainer: the ``StatefulDataset`` interface and its in-memory and synthetic
implementations (streaming loaders implement the same interface)."""
from fastdit.data.base import Batch, StatefulDataset, derive_seed
from fastdit.data.captions import LabelCaptionLatents
from fastdit.data.memory import TensorDictDataset, load_tensor_file
from fastdit.data.prefetch import Prefetcher
from fastdit.data.synthetic import SyntheticLatents

__all__ = ["Batch", "LabelCaptionLatents", "Prefetcher", "StatefulDataset", "TensorDictDataset", "SyntheticLatents",
           "derive_seed", "load_tensor_file"]
