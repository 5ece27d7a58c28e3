"""fastdit bench: time every fastdit piece against every stock alternative on this machine, in one process.

Each workload (a kernel, attention, a module, a training or sampling step at a named shape) runs with each
peer -- fastdit, eager PyTorch, torch.compile, SDPA backends, installed libraries -- and each peer's result
is checked against a reference in the same run. Writes bench.json, summary.md and PNG plots to --out
(default benchmarks/results/<gpu>_<date>/; an existing folder is never overwritten: -2, -3, ... is added).
On the CPU the same code runs tiny shapes through Triton's interpreter: the timings there mean nothing."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import List, Optional

_EPILOG = """\
groups: kernels, attention, modules, train, sample, diffusers (fastdit bench --list shows the cases,
their shapes and peers). A peer that cannot run here (missing library, too little memory) is recorded
with the reason and the run goes on. Exit status: 0, or 1 when a fastdit peer's result fails its check
(2: bad arguments).

examples:
  fastdit bench                                   # everything, full shapes
  fastdit bench --group kernels,attention --quick
  fastdit bench --group attention --shape seq4096,seq16384 --graph
  fastdit bench --list
  fastdit bench --merge part1/bench.json,part2/bench.json --out full   # one report from runs in parts
"""

CPU_WARNING = ("warning: running on the CPU: these timings mean NOTHING (tiny shapes, Triton's interpreter, "
               "time.perf_counter); --quick is forced. Run on a GPU for real figures.")


def parser(prog: str = "fastdit bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", default=None, help="comma-separated groups to run (default: all)")
    p.add_argument("--shape", default=None, help="comma-separated shape names to run (default: all)")
    p.add_argument("--quick", action="store_true", help="small shapes and short timings (always on the CPU)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="report folder (default benchmarks/results/<gpu-slug>_<YYYY-MM-DD>/); a folder that "
                        "holds files already gets -2, -3, ... instead of being overwritten")
    p.add_argument("--list", action="store_true", help="print the groups, cases, shapes and peers, and exit")
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replays (GPU time without "
                                                        "host overhead)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--skip-peers", default="", metavar="NAMES",
                   help="comma-separated peers not to run, recorded as skipped (e.g. compile-max-autotune)")
    p.add_argument("--merge", default=None, metavar="JSONS",
                   help="comma-separated bench.json files (or their folders) of runs in parts -- same GPU, "
                        "versions and commit -- to write as one report in --out; runs nothing")
    return p


PARTIAL_NAME = "bench.partial.json"


def write_partial(out: Path, record) -> None:
    """The record so far, rewritten after each workload: a run killed by a time limit keeps what it measured
    (``--merge`` takes this file as one part). Removed when the full report is written."""
    import json

    from fastdit.bench.report import jsonable_record

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (PARTIAL_NAME + ".tmp")
    data = {**jsonable_record(record), "complete": False}
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    tmp.replace(out / PARTIAL_NAME)


def merge_main(args, prog: str) -> int:
    from fastdit.bench.merge import load_run, merge_runs
    from fastdit.bench.report import headline_table, write_report

    try:
        record = merge_runs([load_run(path.strip()) for path in args.merge.split(",") if path.strip()])
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if not args.out:
        print(f"{prog}: error: --merge needs --out (the merged report's folder)", file=sys.stderr)
        return 2
    out = unused_folder(args.out)
    paths = write_report(record, out)
    print(headline_table(record))
    print(f"\nmerged {len(record['parts'])} runs into {paths['summary.md']}")
    return 0


def unused_folder(path: "str | os.PathLike") -> Path:
    """``path`` when it does not exist or is an empty folder, else the first of ``path-2``, ``path-3``, ...
    that is: a report never overwrites an existing folder's files."""
    path = Path(path)

    def free(candidate: Path) -> bool:
        return not candidate.exists() or (candidate.is_dir() and not any(candidate.iterdir()))

    if free(path):
        return path
    suffix = 2
    while not free(path.with_name(f"{path.name}-{suffix}")):
        suffix += 1
    return path.with_name(f"{path.name}-{suffix}")


def list_lines(cases) -> List[str]:
    """``--list``: the groups, then each case with its shapes (quick ones apart) and its peers if known."""
    from fastdit.bench.registry import GROUPS

    lines = [f"groups: {', '.join(GROUPS)}"]
    for group in GROUPS:
        mine = [case for case in cases if case.group == group]
        if not mine:
            continue
        lines.append(f"{group}:")
        for case in mine:
            lines.append(f"  {case.name}")
            lines.append(f"    shapes: {', '.join(case.shapes) or '-'}")
            lines.append(f"    quick shapes: {', '.join(case.quick_shapes) or '-'}")
            if case.peers:
                lines.append(f"    peers: {', '.join(case.peers)}")
    if not cases:
        lines.append("(no cases registered)")
    return lines


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main(argv: Optional[List[str]] = None, prog: str = "fastdit bench") -> int:
    p = parser(prog)
    args = p.parse_args(argv)
    if args.merge:
        return merge_main(args, prog)
    device = _device(args.device)
    if device == "cpu":
        # fastdit's Triton kernels run on the CPU only through the interpreter, which must be on before any
        # kernel is defined (before the case modules import the ops)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from fastdit.bench.registry import Context, all_cases, select
    from fastdit.bench.report import headline_table, write_report
    from fastdit.bench.runner import run
    from fastdit.bench.timing import gpu_slug

    if device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    try:
        cases = select(all_cases(), groups=args.group, shapes=args.shape)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(list_lines(cases)))
        return 0
    if device == "cpu":
        print(CPU_WARNING, file=sys.stderr, flush=True)
    ctx = Context.create(device, quick=args.quick or device == "cpu", seed=args.seed)
    if not any(case.shapes_for(ctx) for case in cases):
        kind = "quick " if ctx.quick else ""
        print(f"{prog}: error: the selection has no {kind}shapes to run (see {prog} --list)", file=sys.stderr)
        return 2
    default = Path("benchmarks") / "results" / f"{gpu_slug(ctx.device)}_{datetime.date.today().isoformat()}"
    out = unused_folder(args.out if args.out else default)
    skip_peers = [name.strip() for name in args.skip_peers.split(",") if name.strip()]
    known = {peer for case in cases for peer in case.peers}
    unknown = sorted(set(skip_peers) - known)
    if unknown and all(case.peers for case in cases):  # every case names its peers: a typo is an error
        print(f"{prog}: error: --skip-peers: no selected case has a peer named {', '.join(unknown)} "
              f"(peers: {', '.join(sorted(known))})", file=sys.stderr)
        return 2
    settings = {"groups": args.group, "shapes": args.shape, "quick": ctx.quick, "skip_peers": skip_peers,
                "argv": list(sys.argv[1:] if argv is None else argv)}
    threads = torch.get_num_threads()
    if device == "cpu":
        # tiny shapes gain nothing from threads, and on a busy machine OpenMP threads that wait for each other
        # make every call many times slower (and the run with it)
        torch.set_num_threads(1)
    try:
        record = run(cases, ctx, progress=not args.no_progress, graph=args.graph, settings=settings,
                     skip_peers=skip_peers, on_row=lambda so_far: write_partial(out, so_far))
    finally:
        torch.set_num_threads(threads)
    paths = write_report(record, out)
    (out / PARTIAL_NAME).unlink(missing_ok=True)
    failed = [(row["name"], row["shape"], peer["name"], peer["status"] if peer["status"] != "ok" else "check failed")
              for row in record.rows for peer in row.get("peers", [])
              if peer["status"] == "failed" or peer.get("check") == "failed"]
    broken = [(row["name"], row["shape"]) for row in record.rows if row.get("status") != "ok"]
    print(headline_table(record))
    print(f"\nreport: {paths['summary.md']} (bench.json, "
          f"{', '.join(name for name in paths if name.endswith('.png')) or 'no plots'}) in {record.seconds:.0f} s")
    if broken or failed:
        print(f"{len(broken)} workload(s) failed to build, {len(failed)} peer(s) failed or gave wrong results: "
              f"see 'Failed, skipped and wrong peers' in {paths['summary.md']}")
    if device == "cpu":
        print(CPU_WARNING)
    wrong = [f for f in failed if f[2].startswith("fastdit") and f[3] == "check failed"]
    if wrong:
        print(f"{prog}: error: fastdit gave wrong results: "
              + "; ".join(f"{name}[{shape}] {peer}" for name, shape, peer, _ in wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
