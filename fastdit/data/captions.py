"""Synthetic latents with *label captions*: each class id names one fixed caption, so an MMDiT can be trained
and sampled class by class without a caption data set."""
from __future__ import annotations

from typing import Any, Dict

import torch

from fastdit.data.base import StatefulDataset
from fastdit.data.synthetic import SyntheticLatents


class LabelCaptionLatents(StatefulDataset):
    """Synthetic latents for an MMDiT: :class:`SyntheticLatents` batches plus ``"context"`` = the caption
    table's row of each label and an all-True ``"context_mask"`` (state = the wrapped dataset's)."""

    def __init__(self, inner: SyntheticLatents, captions: torch.Tensor):
        self.inner, self.captions = inner, captions
        self.batch_size, self.rank, self.world_size, self.seed = (inner.batch_size, inner.rank, inner.world_size,
                                                                  inner.seed)

    def __iter__(self):
        for batch in self.inner:
            y = batch.get("y", torch.zeros(batch["x"].shape[0], dtype=torch.long))
            context = self.captions[y]
            yield {"x": batch["x"], "context": context,
                   "context_mask": torch.ones(context.shape[:2], dtype=torch.bool)}

    def state_dict(self) -> Dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
