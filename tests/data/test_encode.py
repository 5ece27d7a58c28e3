"""EncodedImages: image batches -> latent batches through a latent space and a caption encoder; the position
is the wrapped dataset's, so resume stays exact."""
from __future__ import annotations

import pytest
import torch

from fastdit.data.base import StatefulDataset
from fastdit.data.encode import EncodedImages, images_to_unit_range
from fastdit.latents.autoencoder import ConvAutoencoder


class ImageBatches(StatefulDataset):
    """Deterministic uint8 image batches with labels and captions; position = batches handed out."""

    def __init__(self, batch_size=3, size=8, captions=True):
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, 0, 1, 0
        self.size, self.captions, self.step = size, captions, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.step)
            batch = {"image": torch.randint(0, 256, (self.batch_size, 3, self.size, self.size), generator=g,
                                            dtype=torch.uint8),
                     "y": torch.arange(self.batch_size) + self.step}
            if self.captions:
                batch["caption"] = [f"caption {self.step} {i}" if i else "" for i in range(self.batch_size)]
            self.step += 1
            yield batch

    def state_dict(self):
        return {"kind": "ImageBatches", "step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


class FakeCaptionEncoder:
    """CaptionEncoder's encode signature: a caption's embedding row i is its length + i; empty = null."""

    def encode(self, captions, max_length=None):
        L = max_length or 4
        lengths = torch.tensor([min(len(c.split()), L) for c in captions])
        mask = torch.arange(L)[None] < lengths[:, None]
        emb = (lengths[:, None, None].float() + torch.arange(L)[None, :, None]).expand(-1, -1, 5) * mask[..., None]
        return emb, mask


def test_unit_range_endpoints_and_bad_input():
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 1, 3)
    out = images_to_unit_range(images)
    assert out.dtype == torch.float32 and out.flatten()[:2].tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="uint8"):
        images_to_unit_range(images.float())


@pytest.mark.parametrize("caption_length", [None, 6])
def test_latents_and_captions_match_direct_encoding(caption_length):
    ae = ConvAutoencoder(image_channels=3, latent_channels=4, channels=(8,)).eval()
    ae.latent_stats_fitted.fill_(True)  # unit stats: the raw latents (no "not normalised" warning)
    inner = ImageBatches()
    enc = FakeCaptionEncoder()
    data = EncodedImages(inner, ae, enc, caption_length=caption_length)
    batch = next(iter(data))
    raw = next(iter(ImageBatches()))
    with torch.no_grad():
        expected = ae.encode(raw["image"].double().div(127.5).sub(1).float())
    assert batch["x"].shape == (3, 4, 4, 4)
    torch.testing.assert_close(batch["x"], expected, rtol=1e-5, atol=1e-6)
    assert batch["y"].tolist() == [0, 1, 2]
    context, mask = enc.encode(raw["caption"], caption_length)
    torch.testing.assert_close(batch["context"], context)
    assert batch["context_mask"].dtype == torch.bool and torch.equal(batch["context_mask"], mask)
    assert not batch["context_mask"][0].any()  # the empty caption is the null caption
    assert "caption" not in batch and "image" not in batch


def test_pixel_space_without_a_latent_space_and_captions_dropped_without_an_encoder():
    batch = next(iter(EncodedImages(ImageBatches())))
    assert set(batch) == {"x", "y"} and batch["x"].shape == (3, 3, 8, 8)
    assert float(batch["x"].min()) >= -1 and float(batch["x"].max()) <= 1


def test_missing_captions_is_a_named_error():
    with pytest.raises(ValueError, match="no 'caption'"):
        next(iter(EncodedImages(ImageBatches(captions=False), None, FakeCaptionEncoder())))
    with pytest.raises(ValueError, match="'image'"):
        EncodedImages(ImageBatches()).encode({"x": torch.zeros(1)})


def test_position_is_the_inner_position_and_resume_is_exact():
    data = EncodedImages(ImageBatches())
    it = iter(data)
    for _ in range(2):
        next(it)
    state = data.state_dict()
    expected = next(it)
    fresh = EncodedImages(ImageBatches())
    fresh.load_state_dict(state)
    got = next(iter(fresh))
    assert torch.equal(got["x"], expected["x"]) and torch.equal(got["y"], expected["y"])
    assert data.skip_counts() == {}
