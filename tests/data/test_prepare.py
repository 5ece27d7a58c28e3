"""prepare_latents: images through a (tiny, random) diffusers VAE into latent shards — exactly the latents of
encoding the same images directly, flip views, captions, resumable after a kill with the same shards as an
uninterrupted run, settings that must match, and training data equal to encoding on the fly."""
import json
import os
import zlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdit.data.encode import EncodedImages  # noqa: E402
from fastdit.data.latent_shards import LatentShards, read_manifest, shard_file_name  # noqa: E402
from fastdit.data.prepare import prepare_latents  # noqa: E402
from fastdit.data.streaming import SampleSource, Skip, StreamingDataset  # noqa: E402
from fastdit.latents import AutoencoderKLLatents  # noqa: E402

SIZE = 32


def tiny_vae(seed=0, scaling_factor=0.7, shift_factor=0.1):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=SIZE, scaling_factor=scaling_factor,
        shift_factor=shift_factor)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny convolutions: threads only contend


@pytest.fixture(scope="module")
def space():
    return AutoencoderKLLatents(tiny_vae())


class MemoryImages(SampleSource):
    """Items of uint8 images with labels and captions; every 7th position is a Skip. ``fail_after``: raise
    after that many positions (a killed run)."""

    name = "memory"

    def __init__(self, items=3, per_item=10, size=SIZE, fail_after=None, captions=True, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.images = {f"part-{i}": torch.randint(0, 256, (per_item, 3, size, size), generator=gen,
                                                  dtype=torch.uint8) for i in range(items)}
        self.fail_after, self.captions, self.reads = fail_after, captions, 0
        self.class_names = [f"class{k}" for k in range(5)]

    def items(self):
        return list(self.images)

    def read(self, item, start):
        index = self.items().index(item)
        for p in range(start, len(self.images[item])):
            self.reads += 1
            if self.fail_after is not None and self.reads > self.fail_after:
                raise RuntimeError("killed")
            if p % 7 == 6:
                yield Skip("corrupt image")
                continue
            sample = {"image": self.images[item][p], "y": (index * 3 + p) % 5}
            if self.captions:
                sample["caption"] = f"picture {index} {p}" if p % 4 else ""
            yield sample

    def valid(self):
        """(images, labels, captions) of the usable samples in order."""
        out = [(img, (i * 3 + p) % 5, f"picture {i} {p}" if p % 4 else "")
               for i, item in enumerate(self.items()) for p, img in enumerate(self.images[item]) if p % 7 != 6]
        return torch.stack([o[0] for o in out]), torch.tensor([o[1] for o in out]), [o[2] for o in out]


class WordCaptions:
    """A stand-in for fastdit.text.CaptionEncoder: one deterministic 6-dim vector per word."""

    path, embed_dim, max_length = None, 6, 5

    def encode(self, captions, max_length=None):
        length = max_length or self.max_length
        out, mask = torch.zeros(len(captions), length, 6), torch.zeros(len(captions), length, dtype=torch.bool)
        for i, caption in enumerate(captions):
            for j, word in enumerate(caption.split()[:length]):
                gen = torch.Generator().manual_seed(zlib.crc32(word.encode()))
                out[i, j], mask[i, j] = torch.randn(6, generator=gen), True
        return out, mask


def images_to_unit(images):
    return images.float() / 127.5 - 1.0


def stored(directory, key="x"):
    """One stored tensor over all shards, straight from the files."""
    from safetensors.torch import load_file

    return torch.cat([load_file(os.path.join(directory, s["file"]))[key]
                      for s in read_manifest(str(directory))["shards"]])


def test_latents_are_the_scaled_shifted_posterior_means(tmp_path, space):
    source = MemoryImages(captions=False)
    summary = prepare_latents(source, str(tmp_path), latent_space=space, image_size=SIZE, shard_size=8,
                              batch_size=4, dtype=torch.float32, progress=False)
    images, labels, _ = source.valid()
    n = len(labels)
    assert (summary.num_samples, summary.inputs_read, summary.skips) == (n, 30, {"corrupt image": 30 - n})
    assert summary.num_shards == 4 and summary.complete and summary.resumed_from == 0
    x = stored(tmp_path)
    assert x.shape == (n, 4, SIZE // 2, SIZE // 2) and x.dtype == torch.float32
    # exact: the same batches of 4 through the latent space ...
    direct = torch.cat([space.encode(images_to_unit(images[i:i + 4])) for i in range(0, n, 4)])
    assert torch.equal(x, direct)
    # ... which is (posterior mean - shift) * scale
    with torch.no_grad():
        means = torch.cat([space.vae.encode(images_to_unit(images[i:i + 4])).latent_dist.mean
                           for i in range(0, n, 4)])
    assert torch.equal(x, (means.float() - 0.1) * 0.7)
    assert torch.equal(stored(tmp_path, "y"), labels)


def test_bf16_storage_and_the_manifest(tmp_path, space):
    source = MemoryImages()
    prepare_latents(source, str(tmp_path), latent_space=space, caption_encoder=WordCaptions(), image_size=SIZE,
                    shard_size=16, batch_size=5, progress=False)
    images, labels, captions = source.valid()
    x = stored(tmp_path)
    assert x.dtype == torch.bfloat16
    direct = torch.cat([space.encode(images_to_unit(images[i:i + 5])) for i in range(0, len(labels), 5)])
    torch.testing.assert_close(x.float(), direct, rtol=1e-2, atol=1e-2)
    context, mask = WordCaptions().encode(captions)
    assert torch.equal(stored(tmp_path, "context"), context.bfloat16())
    assert torch.equal(stored(tmp_path, "context_mask"), mask) and not bool(mask[0].any())  # "" = null caption
    m = read_manifest(str(tmp_path), verify_checksums=True)
    ls = m["latent_space"]
    assert ls["class"] == "fastdit.latents.vae.AutoencoderKLLatents"
    assert (ls["scaling_factor"], ls["shift_factor"], ls["latent_channels"], ls["downsample_factor"]) == (
        pytest.approx(0.7), pytest.approx(0.1), 4, 2)
    assert ls["config"]["block_out_channels"] == [8, 16] and len(ls["weights_sha256"]) == 64
    assert m["caption_encoder"]["max_length"] == 5 and m["caption_encoder"]["class"].endswith("WordCaptions")
    assert (m["image_size"], m["latent_shape"], m["dtype"], m["flip_views"]) == (SIZE, [4, 16, 16], "bfloat16", False)
    assert m["class_names"] == source.class_names and m["source"]["name"] == "memory"
    assert m["source"]["num_items"] == 3 and m["complete"] and "created" in m
    assert m["tensors"]["context"] == {"shape": [5, 6], "dtype": "bfloat16"}
    assert m["completed_inputs"]["skips"] == {"corrupt image": 3}


def test_flip_views_are_the_mirrored_images_latents(tmp_path, space):
    source = MemoryImages(items=1, captions=False)
    prepare_latents(source, str(tmp_path), latent_space=space, image_size=SIZE, shard_size=64, batch_size=64,
                    flip_views=True, dtype=torch.float32, progress=False)
    images, _, _ = source.valid()
    assert torch.equal(stored(tmp_path, "x_flip"), space.encode(images_to_unit(images).flip(-1)))
    assert torch.equal(stored(tmp_path, "x"), space.encode(images_to_unit(images)))
    assert read_manifest(str(tmp_path))["flip_views"] is True


@pytest.mark.parametrize("fail_after", [13, 26])
def test_a_killed_run_resumes_to_the_same_shards(tmp_path, space, fail_after):
    args = dict(latent_space=space, caption_encoder=WordCaptions(), image_size=SIZE, shard_size=8, batch_size=3,
                flip_views=True, progress=False)
    whole = tmp_path / "whole"
    reference = prepare_latents(MemoryImages(), str(whole), **args)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="killed"):
        prepare_latents(MemoryImages(fail_after=fail_after), str(part), **args)
    m = read_manifest(str(part), verify_checksums=True)
    assert not m["complete"] and m["num_samples"] % 8 == 0 and m["num_samples"] < reference.num_samples
    assert not [n for n in os.listdir(part) if ".tmp-" in n]
    done = m["num_samples"]
    source = MemoryImages()
    summary = prepare_latents(source, str(part), **args)
    assert summary.resumed_from == done and summary.samples_written == reference.num_samples - done
    assert summary.num_samples == reference.num_samples and summary.skips == reference.skips
    assert source.reads < 30  # the inputs in complete shards were not read again
    assert sorted(os.listdir(part)) == sorted(os.listdir(whole))
    for i in range(reference.num_shards):
        assert (part / shard_file_name(i)).read_bytes() == (whole / shard_file_name(i)).read_bytes()
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (part, whole))
    assert a["shards"] == b["shards"] and a["completed_inputs"] == b["completed_inputs"]
    again = prepare_latents(MemoryImages(fail_after=0), str(part), **args)  # complete: reads nothing
    assert again.samples_written == 0 and again.num_samples == reference.num_samples


def test_resuming_with_other_settings_is_refused(tmp_path, space):
    args = dict(latent_space=space, image_size=SIZE, shard_size=8, batch_size=4, progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_latents(MemoryImages(fail_after=20, captions=False), str(tmp_path), **args)
    with pytest.raises(ValueError, match=r"other settings.*flip_views: recorded False, now True"):
        prepare_latents(MemoryImages(captions=False), str(tmp_path), **{**args, "flip_views": True})
    with pytest.raises(ValueError, match=r"dtype: recorded 'bfloat16', now 'float16'"):
        prepare_latents(MemoryImages(captions=False), str(tmp_path), **{**args, "dtype": torch.float16})
    other = AutoencoderKLLatents(tiny_vae(seed=1))
    with pytest.raises(ValueError, match=r"latent_space.weights_sha256"):
        prepare_latents(MemoryImages(captions=False), str(tmp_path), **{**args, "latent_space": other})
    with pytest.raises(ValueError, match=r"source.num_items: recorded 3, now 2"):
        prepare_latents(MemoryImages(items=2, captions=False), str(tmp_path), **args)
    # batch size may change: it does not change the latents
    summary = prepare_latents(MemoryImages(captions=False), str(tmp_path), **{**args, "batch_size": 8})
    assert summary.complete and summary.resumed_from == 16


def test_bad_sizes_and_missing_captions_fail_clearly(tmp_path, space):
    class Untouchable(MemoryImages):
        def read(self, item, start):
            raise AssertionError("read before the size check")

    with pytest.raises(ValueError, match=r"image size 33 does not fit the latent space AutoencoderKLLatents"):
        prepare_latents(Untouchable(), str(tmp_path / "a"), latent_space=space, image_size=33, progress=False)
    with pytest.raises(ValueError, match=r"memory item 'part-0' position 0: image is torch.uint8 \(3, 16, 16\), "
                                         r"expected uint8 \(3, 32, 32\)"):
        prepare_latents(MemoryImages(size=16), str(tmp_path / "b"), latent_space=space, image_size=SIZE,
                        progress=False)
    with pytest.raises(ValueError, match=r"position 0: no caption, but captions are being encoded"):
        prepare_latents(MemoryImages(captions=False), str(tmp_path / "c"), latent_space=space, image_size=SIZE,
                        caption_encoder=WordCaptions(), progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        prepare_latents(MemoryImages(), str(tmp_path / "d"), latent_space=space, image_size=SIZE, batch_size=0)


def test_training_from_shards_equals_encoding_on_the_fly(tmp_path, space):
    """Same seed, no shuffling, no flips: the batches of latents from the shards are the batches the trainer
    would have encoded from the images (the same samples in the same order, the same latents)."""
    prepare_latents(MemoryImages(), str(tmp_path), latent_space=space, caption_encoder=WordCaptions(),
                    image_size=SIZE, shard_size=8, batch_size=4, dtype=torch.float32, progress=False)
    from_shards = StreamingDataset(LatentShards(str(tmp_path), seed=3), 4, seed=3, shuffle=False)
    on_the_fly = EncodedImages(StreamingDataset(MemoryImages(), 4, seed=3, shuffle=False), space, WordCaptions())
    a, b = iter(from_shards), iter(on_the_fly)
    for _ in range(9):  # 27 usable samples: past the end of the first epoch
        x, y = next(a), next(b)
        assert set(x) == set(y) == {"x", "y", "context", "context_mask"}
        torch.testing.assert_close(x["x"], y["x"], rtol=1e-6, atol=1e-6)
        assert torch.equal(x["y"], y["y"]) and torch.equal(x["context_mask"], y["context_mask"])
        assert torch.equal(x["context"], y["context"])


def test_a_source_that_flips_at_random_is_refused(tmp_path, space):
    source = MemoryImages()
    source.flip = True
    with pytest.raises(ValueError, match="flips images at random.*flip=False"):
        prepare_latents(source, str(tmp_path), latent_space=space, image_size=SIZE, progress=False)
