"""Decode throughput of image tar shards: ``StreamingDataset(WebDatasetImages)``, images per second.

    python benchmarks/data_image_shards.py                      # 2,000 JPEGs of 256x341, print only
    python benchmarks/data_image_shards.py --out DIR            # also write data_image_shards.json / .md

Writes ``--samples`` JPEG samples (short side ``--image-side``, 4:3, smooth random content, quality 90,
with a caption each) into webdataset shards of ``--shard-size`` in a temporary directory, then reads them
through ``StreamingDataset(WebDatasetImages(..., size=--size), --batch)``: decode + centre crop/resize +
flip + collate. Measured with ``num_workers=0`` (the calling process: the per-core figure) and with
``num_workers=2`` (DataLoader worker processes), ``--samples`` images each (in-process: after a
warm-up of two batches; workers: timed from their start, so prefetching cannot inflate the rate). The shards sit in the page cache after writing, so this measures the CPU work, not the disk.
Target: >= 300 images/s per core at 256 px.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import platform
import tarfile
import tempfile
import time
from typing import Dict, List

import numpy as np
from PIL import Image

from fastdit.data.streaming import StreamingDataset
from fastdit.data.webdataset_images import WebDatasetImages

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
from cpu_machine import cpu_model, environment  # noqa: E402



def random_jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A ``side x (4/3 side)`` JPEG with smooth random colour fields (photo-like entropy, not noise)."""
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low, "RGB").resize((side * 4 // 3, side), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 13, size=(side, side * 4 // 3, 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(directory: str, samples: int, shard_size: int, side: int) -> List[str]:
    rng = np.random.default_rng(0)
    paths = []
    for shard, first in enumerate(range(0, samples, shard_size)):
        path = os.path.join(directory, f"bench-{shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for index in range(first, min(first + shard_size, samples)):
                for ext, data in (("jpg", random_jpeg(rng, side)), ("txt", f"sample {index}".encode())):
                    info = tarfile.TarInfo(f"{index:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def measure(pattern: str, size: int, batch: int, samples: int, num_workers: int) -> Dict:
    source = WebDatasetImages(pattern, size, seed=0)
    dataset = StreamingDataset(source, batch, seed=0, num_workers=num_workers,
                               multiprocessing_context="fork" if num_workers else None)
    batches = max(1, samples // batch)
    if num_workers == 0:
        iterator = iter(dataset)
        for _ in range(2):  # warm-up: imports, first shard opens
            next(iterator)
        start = time.perf_counter()
    else:
        # Timed from the start of the workers: a warm-up would let them fill their prefetch queues
        # untimed and inflate the rate (fork start-up is ~0.1 s, so this slightly understates it).
        start = time.perf_counter()
        iterator = iter(dataset)
    for _ in range(batches):
        out = next(iterator)
    seconds = time.perf_counter() - start
    assert out["image"].shape == (batch, 3, size, size)
    del iterator
    return {"num_workers": num_workers, "images": batches * batch, "seconds": round(seconds, 3),
            "images_per_s": round(batches * batch / seconds, 1), "skips": dataset.skip_counts()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for data_image_shards.json / .md (default: print only)")
    p.add_argument("--samples", type=int, default=2000, help="images written (and read per measurement)")
    p.add_argument("--shard-size", type=int, default=250, help="samples per tar shard")
    p.add_argument("--image-side", type=int, default=256, help="short side of the stored JPEGs")
    p.add_argument("--size", type=int, default=256, help="training image side S")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    args = p.parse_args(argv)
    env = environment()

    with tempfile.TemporaryDirectory(prefix="fastdit-image-shards-") as directory:
        start = time.perf_counter()
        shards = write_shards(directory, args.samples, args.shard_size, args.image_side)
        write_s = time.perf_counter() - start
        megabytes = sum(os.path.getsize(s) for s in shards) / 2**20
        pattern = os.path.join(directory, "bench-*.tar")
        runs = [measure(pattern, args.size, args.batch, args.samples, workers) for workers in (0, 2)]

    result = {"benchmark": "data_image_shards", "cpu": cpu_model(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "samples": args.samples, "shards": len(shards),
              "shard_mb": round(megabytes, 1), "stored": f"JPEG q90 {args.image_side}x{args.image_side * 4 // 3}",
              "size": args.size, "batch": args.batch, "write_seconds": round(write_s, 2), "runs": runs,
              "per_core_images_per_s": runs[0]["images_per_s"], "target_per_core": 300,
              "meets_target": runs[0]["images_per_s"] >= 300, "date": env["date"],
              "machine": {**env["machine"], "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
              "versions": env["versions"]}
    lines = [f"# Image shard decode throughput ({result['cpu']}, {result['cpus']} CPUs)", "",
             f"{args.samples} samples ({result['stored']}, {result['shard_mb']} MB in {len(shards)} shards) -> "
             f"uint8 (B, 3, {args.size}, {args.size}), batch {args.batch}; target >= 300 images/s per core.", "",
             "| workers | images | seconds | images/s |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['num_workers']} | {r['images']} | {r['seconds']} | {r['images_per_s']} |" for r in runs]
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "data_image_shards.json"), "w") as handle:
            json.dump(result, handle, indent=2)
        with open(os.path.join(args.out, "data_image_shards.md"), "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
