"""Summary tables of the memory-bound benchmarks (AdaLN, RoPE, QK-norm + RoPE) from result JSON files.

    python benchmarks/summarize_memory_bound.py results/<run>/adaln.json results/<run>/rope.json > results/<run>/summary.md

Where several files measured the same op and shape, the first file given wins.

Per op and shape: fastdit's forward, backward and forward+backward GB/s from CUDA-graph replays (GPU time
alone) with the fraction of the copy bandwidth measured in the same run, the forward as called from Python
(host overhead included), and forward+backward against torch.compile of the stock code and of fastdit's
reference (graph to graph). The backward's graph time is derived: graph(fwd+bwd) − graph(fwd), because a
backward alone cannot be captured for every peer.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

OPS = [("adaln", "LayerNorm + modulate"), ("gated_adaln", "gated residual + LayerNorm + modulate"),
       ("rope_q", "RoPE on q"), ("rope_qk", "RoPE on q and k, one launch"),
       ("qknorm_rope", "QK RMSNorm + RoPE on q and k, one launch")]


def _index(paths):
    rows, meta = defaultdict(dict), []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        copy = data["ceilings"]["copy_GBps"]
        meta.append(f"{path.split('/')[-1]}: commit {data.get('git_commit')}, copy {copy:,.0f} GB/s")
        for r in data["results"]:
            op, direction = r["group"].rsplit(".", 1)
            rows[(op, r["shape"])].setdefault((direction, r["impl"]), (r, copy))  # the first file wins
    return rows, meta, data


def _gbps(nbytes, ms):
    return nbytes / ms / 1e6 if ms and ms > 0 else None


def _cell(rate, copy):
    return "" if rate is None else f"{rate:,.0f} ({100 * rate / copy:.0f}%)"


def main(paths):
    rows, meta, last = _index(paths)
    print(f"GPU {last['gpu']}, torch {last['torch']}, triton {last['triton']}, {last['date']}. bf16. "
          "Cells: GB/s (% of the copy bandwidth of the same run). graph = CUDA-graph replay, L2 flushed; "
          "called = do_bench of the Python call. bwd graph = graph(fwd+bwd) − graph(fwd).")
    print("\n" + "\n".join(f"- {m}" for m in meta))
    for op, title in OPS:
        shapes = [s for (o, s) in rows if o == op]
        if not shapes:
            continue
        print(f"\n### {title}\n")
        print("| shape | fwd graph | fwd called | bwd graph | fwd+bwd graph | compile(stock) fwd+bwd graph "
              "| ÷ compile(stock) | compile(fastdit ref) fwd+bwd graph | ÷ compile(ref) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for shape in shapes:
            cells = rows[(op, shape)]
            fwd, copy = cells.get(("fwd", "fastdit-triton"), (None, 1.0))
            fb, _ = cells.get(("fwd+bwd", "fastdit-triton"), (None, 1.0))
            bwd, _ = cells.get(("bwd", "fastdit-triton"), (None, 1.0))
            if fwd is None or fb is None:
                continue
            bwd_rate = None
            if bwd and fb["ms_graph"] and fwd["ms_graph"] and fb["ms_graph"] > fwd["ms_graph"]:
                bwd_rate = _gbps(bwd["bytes"], fb["ms_graph"] - fwd["ms_graph"])
            peers = []
            for impl in ("compile-stock", "compile-fastdit-reference"):
                peer = cells.get(("fwd+bwd", impl), (None, 1.0))[0]
                if peer and peer.get("ms_graph"):
                    peers += [f"{_gbps(peer['bytes'], peer['ms_graph']):,.0f}",
                              f"{peer['ms_graph'] / fb['ms_graph']:.2f}×"]
                else:
                    peers += ["", ""]
            print(f"| {shape} | {_cell(_gbps(fwd['bytes'], fwd['ms_graph']), copy)} | {_cell(fwd['GBps'], copy)} "
                  f"| {_cell(bwd_rate, copy)} | {_cell(_gbps(fb['bytes'], fb['ms_graph']), copy)} | "
                  + " | ".join(peers) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
