"""Read throughput of latent shards: ``StreamingDataset(LatentShards)`` in one process, samples per second.

    python benchmarks/data_latent_shards.py --out DIR                 # 100k samples of 4x32x32 bf16, batch 256

Writes ``--samples`` random latents (``--shape``, stored ``--dtype``, with labels; ``--flip-views`` adds
``x_flip``) into shards of ``--shard-size`` with :class:`fastdit.data.latent_shards.LatentShardWriter` in a
temporary directory (``--data-dir`` to keep / reuse one), then iterates
``StreamingDataset(LatentShards(dir), batch)`` (shuffled items, ``num_workers=0``: the calling process
only) for ``--passes`` passes over the data after one warm-up pass, and reports samples/s per pass (the
data sit in the page cache after writing, so this measures the reader, not the disk). The target for
the trainer's needs is >= 20,000 samples/s at 4x32x32, batch 256. Writes ``data_latent_shards.json`` and
``data_latent_shards.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import platform
import shutil
import tempfile
import time
from typing import Dict, List

import torch

from fastdit.data.latent_shards import FLOAT_DTYPES, LatentShards, LatentShardWriter, read_manifest
from fastdit.data.streaming import StreamingDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
from cpu_machine import environment  # noqa: E402



def write_random_shards(directory: str, samples: int, shape: List[int], dtype: torch.dtype, shard_size: int,
                        flip_views: bool, seed: int = 0) -> float:
    """Fill ``directory`` with ``samples`` random latents; returns the seconds it took."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    writer = LatentShardWriter(directory, shard_size, {"benchmark": "random latents"})
    block = 4096
    done = 0
    while done < samples:
        n = min(block, samples - done)
        tensors = {"x": torch.randn(n, *shape, generator=gen).to(dtype),
                   "y": torch.randint(0, 1000, (n,), generator=gen)}
        if flip_views:
            tensors["x_flip"] = torch.randn(n, *shape, generator=gen).to(dtype)
        writer.add(tensors, [{"sample": done + i + 1} for i in range(n)])
        done += n
    writer.finish({"sample": samples})
    return time.perf_counter() - start


def measure(directory: str, batch_size: int, passes: int, flip: bool) -> Dict:
    source = LatentShards(directory, seed=0, flip=flip)
    dataset = StreamingDataset(source, batch_size, seed=0, shuffle=True)
    batches_per_pass = max(1, source.num_samples // batch_size)
    it = iter(dataset)
    rates = []
    for p in range(passes + 1):  # pass 0 warms up (imports, first file opens)
        start = time.perf_counter()
        for _ in range(batches_per_pass):
            batch = next(it)
        seconds = time.perf_counter() - start
        if p:
            rates.append(batches_per_pass * batch_size / seconds)
    assert batch["x"].shape[0] == batch_size and batch["x"].dtype == torch.float32
    return {"samples_per_s": rates, "best": max(rates), "median": sorted(rates)[len(rates) // 2],
            "batches_per_pass": batches_per_pass}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for data_latent_shards.json / .md")
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--shape", default="4,32,32", help="latent shape C,H,W (default 4,32,32)")
    p.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), default="bfloat16")
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--passes", type=int, default=3, help="timed passes over the data (after one warm-up)")
    p.add_argument("--flip-views", action="store_true", help="store x_flip too and read with random flips")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a rank under torchrun)")
    p.add_argument("--data-dir", default=None, help="shard directory to write (or reuse, if it has a manifest)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    shape = [int(s) for s in args.shape.split(",")]
    dtype = FLOAT_DTYPES[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    temporary = args.data_dir is None
    directory = tempfile.mkdtemp(prefix="fastdit-latent-bench-") if temporary else args.data_dir
    try:
        write_seconds = None
        if temporary or not os.path.exists(os.path.join(directory, "manifest.json")):
            write_seconds = write_random_shards(directory, args.samples, shape, dtype, args.shard_size,
                                                args.flip_views)
        manifest = read_manifest(directory)
        size = sum(s["bytes"] for s in manifest["shards"])
        result = measure(directory, args.batch_size, args.passes, args.flip_views)
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
    report = {"benchmark": "data_latent_shards", "samples": manifest["num_samples"], "shape": shape,
              "dtype": args.dtype, "shard_size": args.shard_size, "shards": len(manifest["shards"]),
              "bytes": size, "batch_size": args.batch_size, "flip_views": args.flip_views, "threads": args.threads,
              "write_seconds": write_seconds, **result, "target_samples_per_s": 20_000,
              "meets_target": result["median"] >= 20_000, "host": platform.node(), "cpu": platform.processor(),
              "cpus": os.cpu_count(), "torch": torch.__version__,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "date": env["date"],
              "machine": {**env["machine"], "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
              "versions": env["versions"]}
    with open(os.path.join(args.out, "data_latent_shards.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    md = ["| samples | shape | dtype | shards | batch | flips | threads | samples/s (median) | best | target |",
          "|---|---|---|---|---|---|---|---|---|---|",
          f"| {report['samples']} | {'x'.join(map(str, shape))} | {args.dtype} | {report['shards']} | "
          f"{args.batch_size} | {'yes' if args.flip_views else 'no'} | {args.threads} | "
          f"{result['median']:,.0f} | {result['best']:,.0f} | 20,000 |"]
    with open(os.path.join(args.out, "data_latent_shards.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
