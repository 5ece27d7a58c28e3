"""Two `fastdit scaling` runs of the same grid side by side, point by point (e.g. --precision bf16 against fp8):
held-out loss, FD, precision and recall of each, and the ratio of the second to the first.

    python benchmarks/compare_scaling.py RUN_A/scaling.json RUN_B/scaling.json [--labels bf16,fp8] [--out table.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _num(value, spec=".4f") -> str:
    return "—" if value is None else format(value, spec)


def compare(a: dict, b: dict, labels: List[str]) -> List[str]:
    """Markdown lines: one row per point present in both runs (in the first run's order)."""
    points_b = {p["key"]: p for p in b["points"]}
    la, lb = labels
    lines = [f"| point | params | steps | loss {la} | loss {lb} | {lb} / {la} | FD {la} | FD {lb} | "
             f"recall {la} | recall {lb} |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ratios = []
    for p in a["points"]:
        q = points_b.get(p["key"])
        if q is None:
            continue
        la_loss, lb_loss = p.get("held_out_loss"), q.get("held_out_loss")
        ratio = lb_loss / la_loss if la_loss and lb_loss else None
        if ratio is not None:
            ratios.append(ratio)
        lines.append(f"| {p['key']} | {p['params']:,} | {p['steps']} | {_num(la_loss)} | {_num(lb_loss)} | "
                     f"{_num(ratio, '.3f')} | {_num(p.get('fd'), '.2f')} | {_num(q.get('fd'), '.2f')} | "
                     f"{_num(p.get('recall'), '.2f')} | {_num(q.get('recall'), '.2f')} |")
    if ratios:
        lines += ["", f"loss ratio {lb} / {la} over {len(ratios)} points: mean {sum(ratios) / len(ratios):.4f}, "
                      f"min {min(ratios):.4f}, max {max(ratios):.4f}"]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--labels", default="first,second", help="names of the two runs (default first,second)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != 2:
        p.error("--labels takes two names")
    try:
        a, b = (json.loads(Path(path).read_text()) for path in (args.first, args.second))
    except (OSError, json.JSONDecodeError) as err:
        print(f"compare_scaling: error: {err}", file=sys.stderr)
        return 2
    text = "\n".join(compare(a, b, labels))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
