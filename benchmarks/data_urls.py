"""Benchmark: UrlImages through StreamingDataset against a local fault-injecting HTTP server (CPU only).

    python benchmarks/data_urls.py --out benchmarks/results/<date>_cpu_data_urls [--rows 4096] [--workers 0,2]

A server process (the FaultServer of tests/data/test_fetch.py, on 127.0.0.1) serves ``--rows`` JPEGs
(short side ``--size``) of which ~30% are replaced by faults of every kind the server injects (HTTP
errors, 503 after retries, stalled bodies, truncation, oversize bodies, redirect loops, redirects to
private / metadata addresses, a host resolving to a private address, non-images, a 50,000 x 50,000 PNG
header, a cut JPEG); some good rows answer 503 once first (the retry must bring them in). Stalled bodies
(1/15 of the faults, ~2% of rows) hold their fetch until ``--deadline`` (default 1 s: generous for
127.0.0.1, where a good fetch takes milliseconds; a crawl of the internet uses ~10 s and then needs a
look-ahead ``--window`` of about rows/s x deadline, see fastdit/data/urls.py). Good rows cycle through
``--distinct-photos`` encoded JPEGs (every row still has its own URL, fetch and decode).

The table is laid out so every reader's share of an epoch ends exactly on a batch boundary (every chunk
holds the same number of faults, its last row good), so after exactly one epoch of batches the skip
counts must equal the injected faults *exactly*; the benchmark checks that. For each ``--workers`` value
it reads a cold epoch (everything fetched) and a warm one (served from the per-process RamCache), and
reports images/s (with and without DataLoader start-up) and the skip counts. Writes ``data_urls.json``
and ``data_urls.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
from cpu_machine import environment  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# kind -> skip reason UrlImages must report (see fault_url for the route of each kind).
FAULTS = {
    "404": "fetch: http 4xx", "500": "fetch: http 5xx", "503": "fetch: http 5xx", "stall": "fetch: timeout",
    "truncated": "fetch: truncated", "oversize": "fetch: too large", "empty": "fetch: empty",
    "loop": "fetch: redirect loop", "to-private": "fetch: refused address",
    "to-metadata": "fetch: refused address", "rebind": "fetch: refused address", "ftp": "fetch: bad scheme",
    "notimage": "image: not an image", "bomb": "image: too large", "cut-jpeg": "image: truncated",
}
MAX_BYTES = 2_000_000


def load_fault_server_module():
    path = os.path.join(REPO, "tests", "data", "test_fetch.py")
    spec = importlib.util.spec_from_file_location("fastdit_bench_fault_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_photo(seed: int, size: int) -> bytes:
    """A ``size x 1.25 size`` JPEG with smooth structure plus noise (~photo-sized when encoded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size, size * 5 // 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / (20 + 7 * c) + seed + c) * np.cos(yy / 31) for c in range(3)], -1)
    noise = rng.normal(0, 12, size=(h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def plan_rows(rows: int, chunk: int, faults_per_chunk: int, kinds: List[str]) -> List[str]:
    """Per row: "good", "flaky" (503 once, then good) or a fault kind; the same number of faults in every
    chunk, never on a chunk's last row, fault ``kinds`` taken in turn."""
    plan, k = [], 0
    positions = set(range(1, chunk - 1, max(1, (chunk - 2) // faults_per_chunk))[:faults_per_chunk])
    assert len(positions) == faults_per_chunk
    for i in range(rows):
        if i % chunk in positions:
            plan.append(kinds[k % len(kinds)])
            k += 1
        else:
            plan.append("flaky" if i % 13 == 0 else "good")
    return plan


def serve(conn, plan: List[str], size: int, distinct: int) -> None:
    """Server process: build the files, start the FaultServer, send the port, serve until told to stop."""
    fs = load_fault_server_module()
    server = fs.FaultServer()
    cut = make_photo(10**6, size)
    server.add("notimage", b"<html>not an image</html>", "text/html")
    server.add("bomb.png", fs.make_png_bomb(), "image/png")
    server.add("cut.jpg", cut[: len(cut) // 2], "image/jpeg")
    photos = [make_photo(j, size) for j in range(distinct)]
    for i, kind in enumerate(plan):
        if kind in ("good", "flaky"):
            server.add(f"img{i}.jpg", photos[i % distinct], "image/jpeg")
            if kind == "flaky":
                server.flaky[f"img{i}.jpg"] = 1
    conn.send(server.port)
    conn.recv()  # "stop"; the flaky counters are spent after the cold epoch, so a re-run needs a new server
    conn.send(dict(server.hits))
    server.close()


def fault_url(kind: str, base: str, i: int) -> str:
    redirect = lambda to: f"{base}/redirect?" + urllib.parse.urlencode({"to": to})  # noqa: E731
    return {
        "good": f"{base}/file/img{i}.jpg", "flaky": f"{base}/flaky/img{i}.jpg",
        "404": f"{base}/status/404", "500": f"{base}/status/500", "503": f"{base}/status/503",
        "stall": f"{base}/stall", "truncated": f"{base}/truncated", "oversize": f"{base}/oversize/{MAX_BYTES + 1}",
        "empty": f"{base}/empty", "loop": f"{base}/loop/a", "to-private": redirect("http://10.0.0.1/x.jpg"),
        "to-metadata": redirect("http://169.254.169.254/latest/meta-data/"), "rebind": "http://rebind.test/x.jpg",
        "ftp": "ftp://127.0.0.1/x.jpg", "notimage": f"{base}/file/notimage", "bomb": f"{base}/file/bomb.png",
        "cut-jpeg": f"{base}/file/cut.jpg",
    }[kind]


class RebindResolver:
    """getaddrinfo, except that rebind.test resolves to a private address (must be refused)."""

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        if host == "rebind.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]
        return socket.getaddrinfo(host, port, family, type, proto, flags)


def run_case(table_path: str, args, workers: int, good_per_epoch: int, expected: Counter) -> Dict:
    from fastdit.data.fetch import FetchPolicy
    from fastdit.data.streaming import StreamingDataset
    from fastdit.data.urls import UrlImages

    policy = FetchPolicy(deadline_s=args.deadline, max_bytes=MAX_BYTES, retries=2, backoff_s=0.05,
                         allow_networks=("127.0.0.1/32",))
    source = UrlImages(table_path, size=args.size, chunk_size=args.chunk, concurrency=args.concurrency,
                       window=args.window, policy=policy, resolver=RebindResolver(), seed=0)
    data = StreamingDataset(source, batch_size=args.batch_size, seed=0, num_workers=workers,
                            multiprocessing_context="fork" if workers else None)
    batches_per_epoch = good_per_epoch // args.batch_size
    result = {"workers": workers, "batch_size": args.batch_size, "batches_per_epoch": batches_per_epoch}
    start = time.perf_counter()
    it = iter(data)
    first_batch_at = None
    for epoch_name in ("cold", "warm"):
        epoch_start = time.perf_counter()
        for b in range(batches_per_epoch):
            batch = next(it)
            assert batch["image"].shape == (args.batch_size, 3, args.size, args.size)
            if first_batch_at is None:
                first_batch_at = time.perf_counter()
        seconds = time.perf_counter() - epoch_start
        images = batches_per_epoch * args.batch_size
        skips = Counter(data.skip_counts())
        want = Counter({k: v * (1 if epoch_name == "cold" else 2) for k, v in expected.items()})
        result[epoch_name] = {
            "images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
            "skip_counts": dict(sorted(skips.items())), "skips_exact": skips == want,
        }
        if epoch_name == "cold":
            steady = time.perf_counter() - first_batch_at
            result["cold"]["images_per_s_after_first_batch"] = round(
                (images - args.batch_size) / steady, 1) if steady > 0 else None
            result["cold"]["first_batch_s"] = round(first_batch_at - start, 3)
    it.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for data_urls.json and data_urls.md")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024, help="rows per item (UrlImages' default)")
    parser.add_argument("--faults-per-chunk", type=int, default=320, help="320 of 1024 = 31%% faults")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64, help="fetch threads per reader (UrlImages' default)")
    parser.add_argument("--window", type=int, default=256, help="rows submitted ahead (UrlImages' default)")
    parser.add_argument("--deadline", type=float, default=1.0,
                        help="fetch deadline in s (the stalled rows wait it out); 1 s is generous for 127.0.0.1")
    parser.add_argument("--distinct-photos", type=int, default=97, help="distinct JPEGs the good rows cycle through")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--exclude", default="", help="fault kinds left out, comma-separated (e.g. stall)")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    import torch

    env = environment()
    workers_list = [int(w) for w in args.workers.split(",")]
    if args.rows % args.chunk:
        parser.error("--rows must be a multiple of --chunk")
    kinds = [k for k in FAULTS if k not in args.exclude.split(",")]
    plan = plan_rows(args.rows, args.chunk, args.faults_per_chunk, kinds)
    good_per_chunk = args.chunk - args.faults_per_chunk
    chunks = args.rows // args.chunk
    for w in workers_list:
        slots = max(1, w)
        if chunks % slots or (chunks // slots * good_per_chunk) % args.batch_size:
            parser.error(f"with {w} workers each reader's epoch share must be whole batches: "
                         f"{chunks} chunks / {slots} readers x {good_per_chunk} good rows vs batch {args.batch_size}")
    expected = Counter(FAULTS[k] for k in plan if k in FAULTS)
    good_per_epoch = sum(1 for k in plan if k in ("good", "flaky"))
    os.makedirs(args.out, exist_ok=True)
    results = []
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for w in workers_list:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve, args=(child, plan, args.size, args.distinct_photos), daemon=True)
            proc.start()
            port = parent.recv()
            base = f"http://127.0.0.1:{port}"
            table = os.path.join(tmp, f"urls_{w}.jsonl")
            with open(table, "w") as fh:
                for i, kind in enumerate(plan):
                    fh.write(json.dumps({"url": fault_url(kind, base, i), "caption": f"row {i} ({kind})"}) + "\n")
            try:
                result = run_case(table, args, w, good_per_epoch, expected)
            finally:
                parent.send("stop")
                hits = parent.recv()
                proc.join(10)
            result["server_requests"] = sum(hits.values())
            results.append(result)
            print(json.dumps(result), flush=True)
    report = {
        "benchmark": "data_urls", "rows": args.rows, "size": args.size, "chunk": args.chunk,
        "fault_fraction": round(sum(expected.values()) / args.rows, 3), "expected_skips": dict(sorted(expected.items())),
        "deadline_s": args.deadline, "concurrency": args.concurrency, "window": args.window,
        "batch_size": args.batch_size, "distinct_photos": args.distinct_photos, "fault_kinds": kinds,
        "date": env["date"], "machine": {**env["machine"], "torch_threads": torch.get_num_threads(),
                                         "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": env["versions"], "target_images_per_s": 200,
        "results": results,
    }
    # Headline: cold-epoch images/s (everything fetched) with 2 readers, skips exact in every epoch.
    report["meets_target"] = {str(r["workers"]): r["cold"]["images_per_s"] >= 200 and r["cold"]["skips_exact"]
                              and r["warm"]["skips_exact"] for r in results}
    with open(os.path.join(args.out, "data_urls.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    lines = [f"# UrlImages through StreamingDataset ({args.rows} rows, {args.size}px JPEGs, "
             f"{report['fault_fraction']:.0%} faults, {os.cpu_count()} CPUs)", "",
             f"{env['date']}, {env['machine']['cpu_model']}; chunk {args.chunk} rows, window {args.window}, "
             f"{args.concurrency} threads per reader, fetch deadline {args.deadline} s, batch {args.batch_size}; "
             f"load average {env['machine']['loadavg_at_start']} at start, "
             f"{report['machine']['loadavg_at_end']} at end.", "",
             "| workers | epoch | images | s | images/s | images/s after 1st batch | 1st batch s | skips exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for epoch in ("cold", "warm"):
            e = r[epoch]
            lines.append(f"| {r['workers']} | {epoch} | {e['images']} | {e['seconds']} | {e['images_per_s']} | "
                         f"{e.get('images_per_s_after_first_batch', '')} | {e.get('first_batch_s', '')} | "
                         f"{e['skips_exact']} |")
    lines += ["", "Expected skips per epoch: " + ", ".join(f"{k}: {v}" for k, v in sorted(expected.items()))]
    with open(os.path.join(args.out, "data_urls.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = all(r[e]["skips_exact"] for r in results for e in ("cold", "warm"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
