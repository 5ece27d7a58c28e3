"""Image batches to training batches: latents through the run's latent space, captions through its caption
encoder, on the training device, one batch at a time.

The streaming image kinds (``webdataset``, ``urls``, ``folder``) yield ``{"image": uint8 (B, 3, S, S),
"y"?: int64 (B,), "caption"?: list[str]}``; a model trains on ``{"x": latents (B, C, h, w), "y" |
"context" + "context_mask"}``. :class:`EncodedImages` maps one to the other. It runs where the dataset is
iterated — in the trainer that is the prefetch thread, so encoding overlaps the training step — and keeps
the wrapped dataset's position as its own (one image batch in, one latent batch out), so resume stays exact.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from fastdit.data.base import Batch, StatefulDataset

CaptionEncode = Callable[[Sequence[str], Optional[int]], Tuple[torch.Tensor, torch.Tensor]]


def images_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 in [-1, 1] (what latent spaces take)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.float().div_(127.5).sub_(1.0)


class EncodedImages(StatefulDataset):
    """``inner``'s image batches as latent batches.

    latent_space: a :class:`fastdit.latents.LatentSpace` (``encode`` takes [-1, 1] images); None trains on
        pixels (``"x"`` = the images in [-1, 1]).
    caption_encoder: ``encode(captions, max_length) -> (embeddings (B, L, D), mask (B, L))`` (a
        :class:`fastdit.text.CaptionEncoder`); given, a batch's ``"caption"`` list becomes ``"context"`` and
        ``"context_mask"`` (and a batch without captions is an error naming the missing key); None drops
        captions.
    caption_length: L (None: the encoder's default).
    device: where encoding runs (the training device); the latents stay there.
    """

    def __init__(self, inner: StatefulDataset, latent_space: Optional[torch.nn.Module] = None,
                 caption_encoder: Optional[Any] = None, *, caption_length: Optional[int] = None,
                 device: Optional[torch.device] = None):
        self.inner, self.latent_space, self.caption_encoder = inner, latent_space, caption_encoder
        self.caption_length = caption_length
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.batch_size, self.rank, self.world_size, self.seed = (inner.batch_size, inner.rank, inner.world_size,
                                                                  inner.seed)

    def encode(self, batch: Batch) -> Batch:
        """One image batch -> one training batch (see the class docstring)."""
        if "image" not in batch:
            raise ValueError(f"an image batch needs 'image' (uint8 (B, 3, S, S)); got keys {sorted(batch)}")
        images = images_to_unit_range(batch["image"].to(self.device, non_blocking=True))
        with torch.no_grad():
            x = images if self.latent_space is None else self.latent_space.encode(images)
        out: Dict[str, Any] = {"x": x.float()}
        if "y" in batch:
            out["y"] = batch["y"]
        if self.caption_encoder is not None:
            captions = batch.get("caption")
            if captions is None:
                raise ValueError("this run encodes captions, but the data has none (no 'caption' in the batch: "
                                 "image shards need {key}.txt members, URL tables a caption column)")
            with torch.no_grad():
                context, mask = self.caption_encoder.encode(list(captions), self.caption_length)
            out["context"], out["context_mask"] = context.float(), mask.bool()
        return out

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.inner:
            yield self.encode(batch)

    def skip_counts(self) -> Dict[str, int]:
        """The wrapped dataset's skipped samples by reason (empty when it does not count any)."""
        counts = getattr(self.inner, "skip_counts", None)
        return dict(counts()) if callable(counts) else {}

    def state_dict(self) -> Dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
