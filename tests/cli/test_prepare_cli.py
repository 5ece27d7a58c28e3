"""`fastdit prepare`: a folder or webdataset shards through a local VAE / autoencoder into latent shards that
hold exactly the latents of the images, with labels, class names, captions, flip views; clear errors."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from fastdit.cli import main as fastdit_main  # noqa: E402
from fastdit.cli.prepare import main  # noqa: E402
from fastdit.data.folder import ImageFolder  # noqa: E402
from fastdit.data.latent_shards import LatentShards, read_manifest  # noqa: E402
from fastdit.latents import AutoencoderKLLatents, ConvAutoencoder  # noqa: E402

QUIET = ["--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny convolutions: threads only contend


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.6).save_pretrained(path)
    return str(path)


def png(width, height, seed):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """cat/ (4 images), dog/ (3 images + one broken file)."""
    root = tmp_path_factory.mktemp("images")
    for label, (name, count) in enumerate((("cat", 4), ("dog", 3))):
        (root / name).mkdir()
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(png(32 + 8 * i, 40, seed=10 * label + i))
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    return str(root)


def stored_x(out):
    source = LatentShards(out, flip=False)
    return torch.stack([s["x"] for item in source.items() for s in source.read(item, 0)])


def test_a_folder_through_a_vae(tmp_path, vae_dir, folder, capsys):
    out = str(tmp_path / "latents")
    code = main(["--folder", folder, "--out", out, "--size", "32", "--vae", vae_dir, "--shard-size", "4",
                 "--batch-size", "3", "--dtype", "fp32", "--flip-views", *QUIET])
    assert code == 0
    said = capsys.readouterr().out
    assert "7 samples in 2 shards" in said and "1 skipped: not an image: 1" in said
    m = read_manifest(out, verify_checksums=True)
    assert m["class_names"] == ["cat", "dog"] and m["flip_views"] and m["dtype"] == "float32"
    assert m["latent_space"]["path"] == vae_dir and m["latent_space"]["scaling_factor"] == pytest.approx(0.6)
    assert m["image_size"] == 32 and m["latent_shape"] == [4, 16, 16] and m["caption_encoder"] is None
    # the stored latents are the VAE's latents of the folder's images (unflipped)
    source = ImageFolder(folder, 32, flip=False)
    samples = [s for item in source.items() for s in source.read(item, 0) if isinstance(s, dict)]
    images = torch.stack([s["image"] for s in samples]).float() / 127.5 - 1
    space = AutoencoderKLLatents.from_pretrained(vae_dir)
    # encoder batches of 3 are cut at shard boundaries (every 4 samples): [0:3], [3:4], [4:7]
    expected = torch.cat([space.encode(images[a:b]) for a, b in ((0, 3), (3, 4), (4, 7))])
    assert torch.equal(stored_x(out), expected)
    labels = [int(s["y"]) for item in LatentShards(out).items() for s in LatentShards(out).read(item, 0)]
    assert labels == [s["y"] for s in samples] == [0, 0, 0, 0, 1, 1, 1]
    # again: nothing to do
    assert main(["--folder", folder, "--out", out, "--size", "32", "--vae", vae_dir, "--shard-size", "4",
                 "--dtype", "fp32", "--flip-views", *QUIET]) == 0
    assert "already complete: 7 samples in 2 shards" in capsys.readouterr().out
    # other settings into the same directory: refused, naming the difference
    with pytest.raises(SystemExit) as exit_info:
        main(["--folder", folder, "--out", out, "--size", "32", "--vae", vae_dir, "--shard-size", "4", *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "dtype: recorded 'float32', now 'bfloat16'" in err


def test_webdataset_shards_with_labels_and_captions(tmp_path, vae_dir):
    transformers = pytest.importorskip("transformers")
    words = ["a", "red", "blue", "cat", "dog", "photo", "of"]
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    (text_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizer(str(text_dir / "vocab.txt")).save_pretrained(text_dir)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=5 + len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=32)).save_pretrained(text_dir)
    tar_path = tmp_path / "shard-000.tar"
    captions = ["a red cat", "a photo of a dog", "", "blue dog"]
    with tarfile.open(tar_path, "w") as tar:
        for i, caption in enumerate(captions):
            for ext, data in (("png", png(48, 32, i)), ("txt", caption.encode()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "latents")
    assert main(["--images", str(tar_path), "--labels", "--out", out, "--size", "32", "--vae", vae_dir,
                 "--captions-max-length", "6", "--caption-encoder", str(text_dir), *QUIET]) == 0
    m = read_manifest(out)
    assert m["caption_encoder"]["path"] == str(text_dir) and m["caption_encoder"]["max_length"] == 6
    assert m["tensors"]["context"] == {"shape": [6, 8], "dtype": "bfloat16"} and m["dtype"] == "bfloat16"
    source = LatentShards(out, dtype=None)
    samples = list(source.read(source.items()[0], 0))
    assert [int(s["y"]) for s in samples] == [0, 1, 0, 1]
    from fastdit.text import CaptionEncoder

    context, mask = CaptionEncoder(str(text_dir), max_length=6).encode(captions)
    assert torch.equal(torch.stack([s["context_mask"] for s in samples]), mask)
    assert torch.equal(torch.stack([s["context"] for s in samples]), context.bfloat16())


def test_an_autoencoder_file(tmp_path, folder):
    from fastdit.training.build import save_autoencoder

    torch.manual_seed(0)
    ae = ConvAutoencoder(image_channels=3, latent_channels=2, channels=(8,))
    raw = tmp_path / "raw.pt"
    save_autoencoder(ae, str(raw))
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    ae.fit_latent_stats(images)
    fitted = tmp_path / "ae.pt"
    save_autoencoder(ae, str(fitted))
    out = str(tmp_path / "latents")
    assert main(["--folder", folder, "--out", out, "--size", "16", "--autoencoder", str(fitted), "--dtype", "fp16",
                 *QUIET]) == 0
    m = read_manifest(out)
    assert m["latent_space"]["class"] == "fastdit.latents.autoencoder.ConvAutoencoder"
    assert m["latent_space"]["path"] == str(fitted) and len(m["latent_space"]["latent_mean"]) == 2
    assert m["tensors"]["x"] == {"shape": [2, 8, 8], "dtype": "float16"} and m["num_samples"] == 7
    with pytest.raises(SystemExit) as exit_info:
        main(["--folder", folder, "--out", str(tmp_path / "x"), "--size", "16", "--autoencoder", str(raw), *QUIET])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("args, message", [
    (["--size", "33"], "image size 33 does not fit the latent space"),
    (["--size", "32", "--vae-subfolder", "vae", "--autoencoder", "x.pt"], "--vae-subfolder goes with --vae"),
    (["--size", "32", "--vae", "/nonexistent/vae"], "no local AutoencoderKL at /nonexistent/vae"),
    (["--size", "32", "--labels"], "--labels goes with --images"),
    (["--size", "32", "--shard-size", "0"], "--shard-size must be >= 1"),
])
def test_bad_arguments_are_clear_errors(tmp_path, vae_dir, folder, capsys, args, message):
    if "--vae" not in args and "--autoencoder" not in args:
        args = [*args, "--vae", vae_dir]
    with pytest.raises(SystemExit) as exit_info:
        main(["--folder", folder, "--out", str(tmp_path / "out"), *args, *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_the_command_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fastdit_main(["prepare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--flip-views" in text and "--captions-max-length" in text and "fastdit prepare" in text
    with pytest.raises(SystemExit):
        fastdit_main(["--help"])
    assert "prepare" in capsys.readouterr().out
