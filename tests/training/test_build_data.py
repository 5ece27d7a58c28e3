"""The streaming data kinds through the config (fastdit.training.build_data): a DiT trains for a few steps on
a folder of images through a latent space, on webdataset shards in pixel space and on prepared latent shards;
skipped samples are counted in metrics.jsonl; bad settings are ConfigErrors that name them."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.cli.train import main as main_train
from fastdit.data.latent_shards import LatentShardWriter
from fastdit.latents import ConvAutoencoder
from fastdit.training import TrainConfig
from fastdit.training.build import build, save_autoencoder
from fastdit.training.config import ConfigError

TINY_DIT = ["model.name=DiT-S/2", "model.options.depth=1", "model.options.hidden_size=32",
            "model.options.num_heads=2", "model.options.num_classes=10"]
QUIET = ["run.device=cpu", "logging.progress_bar=false", "logging.tensorboard=false", "data.batch_size=4",
         "logging.sample_every=0", "data.num_classes=3", "data.options.num_workers=0"]


def _png(value: int, size=(12, 10)) -> bytes:
    rng = np.random.default_rng(value)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _image_folder(root, per_class=4, corrupt=1):
    for c in range(3):
        os.makedirs(root / f"class_{c}", exist_ok=True)
        for i in range(per_class):
            (root / f"class_{c}" / f"{i}.png").write_bytes(_png(10 * c + i))
    for i in range(corrupt):
        (root / "class_0" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _shards(folder, counts=(5, 3)):
    os.makedirs(folder, exist_ok=True)
    for s, count in enumerate(counts):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for j in range(count):
                for name, data in ((f"{s}{j:03d}.png", _png(100 * s + j)), (f"{s}{j:03d}.cls", str(j % 3).encode()),
                                   (f"{s}{j:03d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"shard-{s}.tar").write_bytes(buf.getvalue())
    return str(folder / ("shard-{0..%d}.tar" % (len(counts) - 1)))


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if "event" not in r]


def _train(out, *extra, steps=2):
    return main_train(["--output-dir", str(out), "--max-steps", str(steps), "--precision", "fp32", *QUIET,
                       *TINY_DIT, *extra])


def test_dit_trains_on_an_image_folder_through_a_latent_space(tmp_path):
    ae = ConvAutoencoder(image_channels=3, latent_channels=4, channels=(8,))
    ae.latent_stats_fitted.fill_(True)
    save_autoencoder(ae, str(tmp_path / "ae.pt"))
    folder = _image_folder(tmp_path / "images")
    assert _train(tmp_path / "run", "data.kind=folder", f"data.path={folder}",
                  f"data.options.autoencoder={tmp_path / 'ae.pt'}", "data.options.image_size=8") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["latent_shape"] == [4, 4, 4]  # 8 px through a factor-2 latent space
    skips = _metrics(tmp_path / "run")[-1]["data_skips"]
    assert set(skips) == {"not an image"} and skips["not an image"] >= 1  # the broken file, once per pass read


def test_dit_trains_on_webdataset_shards_in_pixel_space_and_resumes(tmp_path):
    pattern = _shards(tmp_path / "shards")
    common = ["data.kind=webdataset", f"data.path={pattern}", "data.options.image_size=8", "checkpoint.every=2",
              "logging.every=1"]
    assert _train(tmp_path / "straight", *common, steps=4) == 0
    assert _train(tmp_path / "run", *common, steps=2) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["latent_shape"] == [3, 8, 8]
    assert _train(tmp_path / "run", *common, steps=4) == 0  # resumes from step 2
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # the same batches after the resume


def test_dit_trains_on_latent_shards(tmp_path):
    gen = torch.Generator().manual_seed(0)
    writer = LatentShardWriter(str(tmp_path / "latents"), 5, {"test": True})
    writer.add({"x": torch.randn(12, 4, 8, 8, generator=gen), "y": torch.arange(12) % 3}, list(range(12)))
    writer.finish(12)
    assert _train(tmp_path / "run", "data.kind=latents", f"data.path={tmp_path / 'latents'}") == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["latent_shape"] == [4, 8, 8]


def _config(*overrides):
    quiet = [o for o in QUIET if "data.kind=memory" not in overrides or not o.startswith("data.options.")]
    return TrainConfig.from_dict({}, [*quiet, *TINY_DIT, *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["data.kind=webdataset"], "needs data.path"),
    (["data.kind=webdataset", "data.path=/nonexistent/shard-{0..3}.tar"], "matches nothing|no shard|nothing"),
    (["data.kind=urls", "data.path=/nonexistent.parquet"], "class labels|captions"),
    (["data.kind=folder", "data.path=DIR", "data.options.num_workers=-1"], "num_workers"),
    (["data.kind=folder", "data.path=DIR", "data.options.colour=1"], "unknown key"),
    (["data.kind=folder", "data.path=DIR", "data.options.image_size=0"], "image_size"),
    (["data.kind=latents", "data.path=DIR"], "manifest"),
])
def test_bad_streaming_settings_are_named(tmp_path, overrides, message):
    folder = _image_folder(tmp_path / "images", per_class=1, corrupt=0)
    overrides = [o.replace("DIR", str(folder)) for o in overrides]
    with pytest.raises(ConfigError, match=message):
        build(_config(*overrides), rank=0, world_size=1)


def test_mmdit_on_images_needs_its_caption_encoder_named(tmp_path):
    pattern = _shards(tmp_path / "shards")
    cfg = TrainConfig.from_dict({}, [*QUIET, "model.name=MMDiT-Tiny/2", "data.kind=webdataset",
                                     f"data.path={pattern}", "data.options.image_size=8"])
    with pytest.raises(ConfigError, match="caption_encoder"):
        build(cfg, rank=0, world_size=1)


@pytest.mark.parametrize("kind", ["latents", "memory"])
def test_the_latent_space_is_checked_against_the_shape_the_data_sets(tmp_path, kind):
    """Latent shards and memory files set data.latent_shape themselves; a latent space configured for the
    grids (8 channels here, not the default 4) is checked against that shape, not the default."""
    ae = ConvAutoencoder(image_channels=3, latent_channels=8, channels=(8,))
    ae.latent_stats_fitted.fill_(True)
    save_autoencoder(ae, str(tmp_path / "ae.pt"))
    x, y = torch.randn(12, 8, 4, 4), torch.arange(12) % 3
    if kind == "latents":
        writer = LatentShardWriter(str(tmp_path / "data"), 5, {"test": True})
        writer.add({"x": x, "y": y}, list(range(12)))
        writer.finish(12)
        path = tmp_path / "data"
    else:
        path = tmp_path / "data.pt"
        torch.save({"x": x, "y": y}, path)
    built = build(_config(f"data.kind={kind}", f"data.path={path}", f"data.options.autoencoder={tmp_path / 'ae.pt'}"),
                  rank=0, world_size=1)
    assert tuple(built.config.data.latent_shape) == (8, 4, 4) and built.latent_space.latent_channels == 8
    wrong = ConvAutoencoder(image_channels=3, latent_channels=4, channels=(8,))
    save_autoencoder(wrong, str(tmp_path / "wrong.pt"))
    with pytest.raises(ConfigError, match="8, 4, 4"):
        build(_config(f"data.kind={kind}", f"data.path={path}", f"data.options.autoencoder={tmp_path / 'wrong.pt'}"),
              rank=0, world_size=1)
