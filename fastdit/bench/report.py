"""The report of a bench run: ``bench.json`` (everything), ``summary.md`` (tables), PNG plots, and the
README's headline block.

``summary.md`` opens with what ran (GPU, driver, CUDA, cuDNN, torch, triton, commit, date) and the ceilings
measured in the run, then the headline (fastdit's speed-up over the fastest stock peer of each workload),
then one table per group with a row per peer: its median ms (p20-p80), rates, fastdit's speed-up over it,
peak memory, setup seconds (build + first call: compilation and autotuning) and check; then every failed or skipped peer with its reason. Plots (each written only when
it has data): ``speedup_kernels.png``, ``attention_vs_seqlen.png`` (workloads whose shape names are
``seq<N>``), ``end_to_end.png`` (items/s of train / sample / diffusers workloads), ``memory.png``.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastdit.bench.registry import GROUPS

JSON_NAME = "bench.json"
MARKDOWN_NAME = "summary.md"
PLOT_NAMES = {
    "speedup_kernels.png": "kernel speed-ups",
    "attention_vs_seqlen.png": "attention vs sequence length",
    "end_to_end.png": "train / sample throughput",
    "memory.png": "peak memory",
}
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"
CPU_WARNING = ("**CPU run: these timings mean nothing.** Tiny shapes, Triton's interpreter and "
               "`time.perf_counter` exercise the bench code only; run `fastdit bench` on a GPU for figures.")


# ---------------------------------------------------------------------------------------------- formatting

def _as_dict(run: Any) -> Dict[str, Any]:
    return run.to_dict() if hasattr(run, "to_dict") else dict(run)


def jsonable_record(run: Any) -> Dict[str, Any]:
    """A bench record (:class:`~fastdit.bench.runner.BenchRun` or dict) as plain JSON values."""
    return _jsonable(_as_dict(run))


def _jsonable(value: Any) -> Any:
    """Plain JSON values: non-finite floats become None, unknown objects their ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _num(value: Optional[float]) -> str:
    """A figure with 3-4 significant digits, thousands separated, never in exponent form."""
    if value is None:
        return "—"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 1:
        return f"{value:.{3 - len(str(int(size)))}f}" if size < 100 else f"{value:.1f}"
    if size == 0:
        return "0"
    return f"{value:.{2 - int(math.floor(math.log10(size)))}f}"


def _bytes(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value >= 10 * 2**30:
        return f"{value / 2**30:.1f} GiB"
    return f"{value / 2**20:,.1f} MiB"


def _speedup(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


def _rate(peer: Dict[str, Any], row: Dict[str, Any]) -> str:
    parts = []
    if peer.get("GBps") is not None:
        frac = peer.get("fraction_of_copy")
        parts.append(f"{_num(peer['GBps'])} GB/s" + (f" ({100 * frac:.0f}% of copy)" if frac is not None else ""))
    if peer.get("TFLOPs") is not None:
        frac = peer.get("fraction_of_matmul")
        parts.append(f"{_num(peer['TFLOPs'])} TFLOP/s"
                     + (f" ({100 * frac:.0f}% of bf16 mm)" if frac is not None else ""))
    if peer.get("items_per_s") is not None:
        parts.append(f"{_num(peer['items_per_s'])} {row.get('item_unit') or 'items'}/s")
    return "; ".join(parts) or "—"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _is_cpu(data: Dict[str, Any]) -> bool:
    return str(data.get("context", {}).get("device", "cpu")).startswith("cpu")


def _fastdit(row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    name = row.get("fastdit_peer")
    return next((p for p in row.get("peers", []) if p["name"] == name), None) if name else None


# ------------------------------------------------------------------------------------------------ markdown

def environment_lines(data: Dict[str, Any]) -> List[str]:
    """The header table: what ran, the ceilings, the settings."""
    env, ceil, ctx = data.get("environment", {}), data.get("ceilings", {}), data.get("context", {})
    if env.get("gpu"):
        device = (f"{env['gpu']} ({env.get('sm_count')} SMs, {env.get('gpu_memory_GiB')} GiB, "
                  f"compute capability {env.get('compute_capability')})")
    else:
        device = f"CPU ({env.get('cpu') or 'unknown'}), {env.get('platform', '')}"
    ceiling_parts = []
    for key, label, unit in (("copy_GBps", "copy", "GB/s"), ("bf16_matmul_TFLOPs", "bf16 matmul", "TFLOP/s"),
                             ("fp8_matmul_TFLOPs", "fp8 matmul", "TFLOP/s")):
        if ceil.get(key) is not None:
            ceiling_parts.append(f"{label} {_num(ceil[key])} {unit}")
        else:
            ceiling_parts.append(f"{label}: skipped ({ceil.get('skipped', {}).get(key, 'not measured')})")
    settings = data.get("settings", {})
    rows = [
        ("device", device),
        ("driver", env.get("driver") or "—"),
        ("CUDA / cuDNN", f"{env.get('cuda') or '—'} / {env.get('cudnn') or '—'}"),
        ("torch / triton / python", f"{env.get('torch')} / {env.get('triton') or '—'} / {env.get('python')}"),
        ("fastdit", f"{env.get('fastdit')} @ commit {env.get('git_commit') or 'unknown'}"),
        ("date", env.get("time_utc") or env.get("date")),
        ("ceilings", " · ".join(ceiling_parts) + (f" — {ceil['label']}" if ceil.get("label") else "")),
        ("run", f"dtype {ctx.get('dtype')}, {'quick' if ctx.get('quick') else 'full'} shapes, "
                f"CUDA-graph figures {'on' if settings.get('graph') else 'off'}, {data.get('seconds', 0):.0f} s"),
        ("timer", env.get("timer", "—")),
    ]
    for number, part in enumerate(data.get("parts") or [], 1):
        part_env, part_settings = part.get("environment", {}), part.get("settings", {})
        rows.append((f"part {number}", f"{part.get('workloads')} workloads, groups "
                     f"{part_settings.get('groups') or 'all'}, {part_env.get('time_utc') or part_env.get('date')}, "
                     f"{float(part.get('seconds') or 0):.0f} s (every peer of a workload ran in one process)"))
    return _table(["", ""], rows)


def headline_rows(data: Dict[str, Any]) -> List[Tuple[str, ...]]:
    """(group, workload, shape, fastdit ms, fastest stock peer (ms), speed-up) for every workload."""
    out = []
    for row in data.get("rows", []):
        ours, best = _fastdit(row), row.get("fastest_stock")
        if row.get("status") != "ok":
            mine, stock, speed = "—", "—", f"workload failed: {row.get('reason', '')[:80]}"
        elif ours is None:
            failed = next((p for p in row.get("peers", []) if p["name"].startswith("fastdit")), None)
            why = f"fastdit {failed['status']}" if failed else "no fastdit peer"
            mine, stock, speed = "—", (f"{best['peer']} ({_num(best['ms'])})" if best else "—"), why
        else:
            check = " (check FAILED)" if ours.get("check") == "failed" else ""
            mine = _num(ours["ms"]) + check
            stock = f"{best['peer']} ({_num(best['ms'])})" if best else "—"
            speed = f"**{_speedup(best['speedup'])}**" if best else "no stock peer ran"
        out.append((row["group"], row["name"], row["shape"], mine, stock, speed))
    return out


HEADLINE_HEADER = ("group", "workload", "shape", "fastdit ms", "fastest stock peer (ms)", "fastdit speed-up")


def headline_table(run: Any) -> str:
    """The headline as markdown: fastdit's speed-up over the fastest stock peer of each workload."""
    return "\n".join(_table(HEADLINE_HEADER, headline_rows(_as_dict(run))))


def group_table(rows: List[Dict[str, Any]]) -> List[str]:
    """One row per (workload, peer); the workload's name, shape and dims on its first row only."""
    out = []
    for row in rows:
        if row.get("status") != "ok":
            out.append((row["name"], row["shape"], row.get("dims") or "—", "(workload)", "failed", "—", "—",
                        "—", "—", "—", row.get("reason", "")))
            continue
        best = row.get("fastest_stock")
        for index, peer in enumerate(row.get("peers", [])):
            first = index == 0
            lead = (row["name"], row["shape"], row.get("dims") or "—") if first else ("", "", "")
            name = peer["name"] + (" (fastest stock)" if best and best["peer"] == peer["name"] else "")
            if peer["status"] != "ok":
                stage = f"{peer['stage']}: " if peer.get("stage") else ""
                reason = (stage + peer.get("reason", ""))[:160]
                out.append((*lead, name, peer["status"], "—", "—", "—", "—", "—", reason))
                continue
            ms = f"{_num(peer['ms'])} ({_num(peer['p20'])}–{_num(peer['p80'])})"
            if peer.get("ms_graph") is not None:
                ms += f"; graph {_num(peer['ms_graph'])}"
            if peer["name"] == row.get("fastdit_peer"):
                speed = f"vs fastest stock: {_speedup(best['speedup'])} ({best['peer']})" if best else "—"
            else:
                speed = _speedup(peer.get("fastdit_speedup"))
            check = peer.get("check", "—")
            if check == "failed":
                check = f"FAILED: {peer.get('check_detail', '')}"
            elif check == "passed":
                check = f"ok: {peer.get('check_detail', '')}"
            setup = (peer.get("build_seconds") or 0) + (peer.get("first_call_seconds") or 0)
            out.append((*lead, name, "ok", ms, _rate(peer, row), speed, _bytes(peer.get("peak_memory_bytes")),
                        _num(setup), check[:160]))
    header = ("workload", "shape", "dims", "peer", "status", "ms (p20–p80)", "rate", "fastdit speed-up",
              "peak memory", "setup s", "check")
    return _table(header, out)


def problem_lines(data: Dict[str, Any]) -> List[str]:
    """Every workload that failed to build and every failed or wrong peer, with its reason; then the skipped
    peers, one line per (peer, reason) with the workloads it concerns."""
    lines: List[str] = []
    skipped: Dict[Tuple[str, str], List[str]] = {}
    for row in data.get("rows", []):
        where = f"`{row['name']}` [{row['shape']}]"
        if row.get("status") != "ok":
            lines.append(f"- {where}: the workload failed to build — {row.get('reason', '')}")
            continue
        reference = row.get("reference", {})
        if reference.get("status") == "failed":
            lines.append(f"- {where}: the reference failed — {reference.get('reason', '')}")
        for peer in row.get("peers", []):
            if peer["status"] == "skipped":
                skipped.setdefault((peer["name"], peer.get("reason", "")), []).append(where)
            elif peer["status"] == "failed":
                lines.append(f"- {where} **{peer['name']}** failed at {peer.get('stage', '?')} — "
                             f"{peer.get('reason', '')}")
            elif peer.get("check") == "failed":
                lines.append(f"- {where} **{peer['name']}** check FAILED — {peer.get('check_detail', '')}")
    for (name, reason), wheres in skipped.items():
        listed = ", ".join(wheres[:4]) + (f" and {len(wheres) - 4} more" if len(wheres) > 4 else "")
        lines.append(f"- **{name}** skipped ({len(wheres)} workload{'s' if len(wheres) > 1 else ''}: {listed}) "
                     f"— {reason}")
    return lines


def summary_markdown(run: Any) -> str:
    """The whole ``summary.md``."""
    data = _as_dict(run)
    env = data.get("environment", {})
    title = env.get("gpu") or "CPU"
    lines = [f"# fastdit bench — {title} — {env.get('date', '')}", ""]
    if _is_cpu(data):
        lines += [CPU_WARNING, ""]
    lines += environment_lines(data) + [""]
    lines += ["## Headline: fastdit against the fastest stock peer", "",
              "Speed-up = the stock peer's median ms / fastdit's (above 1: fastdit is faster). The fastest stock "
              "peer is the fastest non-fastdit peer whose result passed its check.", ""]
    lines += _table(HEADLINE_HEADER, headline_rows(data)) + [""]
    by_group: Dict[str, List[Dict[str, Any]]] = {}
    for row in data.get("rows", []):
        by_group.setdefault(row["group"], []).append(row)
    for group in sorted(by_group, key=lambda g: GROUPS.index(g) if g in GROUPS else len(GROUPS)):
        lines += [f"## {group}", ""] + group_table(by_group[group]) + [""]
    problems = problem_lines(data)
    lines += ["## Failed, skipped and wrong peers", ""] + (problems or ["None."]) + [""]
    if _is_cpu(data):
        lines += [CPU_WARNING, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    """A matplotlib figure drawn with the Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(names: Sequence[str]) -> Dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _peer_names(rows: Sequence[Dict[str, Any]], key: str) -> List[str]:
    names: List[str] = []
    for row in rows:
        for peer in row.get("peers", []):
            if peer.get(key) is not None and peer["name"] not in names:
                names.append(peer["name"])
    return names


def _peer_colors(data: Dict[str, Any]) -> Dict[str, Any]:
    """One color per peer name across every plot of a run."""
    names: List[str] = []
    for row in data.get("rows", []):
        names += [p["name"] for p in row.get("peers", []) if p["name"] not in names]
    return _colors(names)


def _grouped_bars(ax, labels: List[str], series: Dict[str, List[Optional[float]]], colors, log: bool = False):
    """Horizontal grouped bars: one group per label (top to bottom), one bar per series."""
    count = max(len(series), 1)
    height = 0.8 / count
    for k, (name, values) in enumerate(series.items()):
        ys = [i - 0.4 + height * (k + 0.5) for i in range(len(labels))]
        xs = [v if v is not None else float("nan") for v in values]
        ax.barh(ys, xs, height=height, color=colors[name], label=name)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    if log:
        ax.set_xscale("log")
    ax.grid(axis="x", alpha=0.3)


def _title(data: Dict[str, Any], what: str) -> str:
    env = data.get("environment", {})
    where = env.get("gpu") or "CPU — timings mean nothing"
    return f"{what}\n{where}, torch {env.get('torch')}, {env.get('date', '')}"


def plot_kernel_speedups(data: Dict[str, Any], path: Path) -> bool:
    rows = [r for r in data.get("rows", []) if r["group"] == "kernels" and r.get("fastdit_speedup")]
    if not rows:
        return False
    peers = _peer_names(rows, "fastdit_speedup")
    labels = [f"{r['name']} [{r['shape']}]" for r in rows]
    series = {p: [r["fastdit_speedup"].get(p) for r in rows] for p in peers}
    fig = _figure(9, 1.2 + 0.25 * len(rows) * max(1, len(peers)) ** 0.5)
    ax = fig.add_subplot()
    _grouped_bars(ax, labels, series, _peer_colors(data), log=True)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("fastdit speed-up over the peer (its ms / fastdit's ms; >1: fastdit faster; log scale)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(_title(data, "fastdit kernels against each peer"), fontsize=10)
    fig.savefig(path, dpi=120)
    return True


def _seqlen(shape: str) -> Optional[int]:
    match = re.fullmatch(r"seq(\d+)(k?)", shape.lower())
    if not match:
        return None
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def plot_attention_vs_seqlen(data: Dict[str, Any], path: Path) -> bool:
    rows = [r for r in data.get("rows", []) if r["group"] == "attention" and _seqlen(r["shape"]) is not None]
    names = []
    for r in rows:
        if r["name"] not in names and any(p.get("TFLOPs") is not None for p in r.get("peers", [])):
            names.append(r["name"])
    if not names:
        return False
    peers = _peer_names(rows, "TFLOPs")
    colors = _peer_colors(data)
    fig = _figure(6 * min(len(names), 3), 4.2 * math.ceil(len(names) / 3))
    for index, name in enumerate(names):
        ax = fig.add_subplot(math.ceil(len(names) / 3), min(len(names), 3), index + 1)
        mine = sorted((r for r in rows if r["name"] == name), key=lambda r: _seqlen(r["shape"]))
        for peer in peers:
            points = [(_seqlen(r["shape"]), p["TFLOPs"]) for r in mine for p in r["peers"]
                      if p["name"] == peer and p.get("TFLOPs") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=colors[peer], label=peer,
                        linewidth=2.5 if peer.startswith("fastdit") else 1.2)
        ax.set_xscale("log", base=2)
        lengths = sorted({_seqlen(r["shape"]) for r in mine})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(data, "attention throughput against sequence length"), fontsize=10)
    fig.savefig(path, dpi=120)
    return True


def plot_end_to_end(data: Dict[str, Any], path: Path) -> bool:
    rows = [r for r in data.get("rows", []) if r["group"] in ("train", "sample", "diffusers")
            and any(p.get("items_per_s") is not None for p in r.get("peers", []))]
    if not rows:
        return False
    colors = _peer_colors(data)
    fig = _figure(8, 0.6 + sum(0.9 + 0.3 * len(r["peers"]) for r in rows))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, row in zip(axes, rows):
        timed = [p for p in row["peers"] if p.get("items_per_s") is not None]
        ax.barh(range(len(timed)), [p["items_per_s"] for p in timed], color=[colors[p["name"]] for p in timed])
        ax.set_yticks(range(len(timed)), [p["name"] for p in timed], fontsize=8)
        ax.set_ylim(len(timed) - 0.5, -0.5)
        ax.set_xlabel(f"{row.get('item_unit') or 'items'}/s")
        ax.set_title(f"{row['name']} [{row['shape']}] {row.get('dims') or ''}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(_title(data, "end-to-end throughput per peer"), fontsize=10)
    fig.savefig(path, dpi=120)
    return True


def plot_memory(data: Dict[str, Any], path: Path) -> bool:
    rows = [r for r in data.get("rows", []) if any(p.get("peak_memory_bytes") for p in r.get("peers", []))]
    if not rows:
        return False
    peers = _peer_names(rows, "peak_memory_bytes")
    labels = [f"{r['name']} [{r['shape']}]" for r in rows]
    series = {}
    for peer in peers:
        values = []
        for r in rows:
            match = next((p for p in r["peers"] if p["name"] == peer), None)
            value = match.get("peak_memory_bytes") if match else None
            values.append(value / 2**20 if value else None)
        series[peer] = values
    fig = _figure(9, 1.2 + 0.25 * len(rows) * max(1, len(peers)) ** 0.5)
    ax = fig.add_subplot()
    _grouped_bars(ax, labels, series, _peer_colors(data), log=True)
    ax.set_xlabel("peak memory of one call above its inputs (MiB, log scale)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(_title(data, "peak memory per peer"), fontsize=10)
    fig.savefig(path, dpi=120)
    return True


PLOTTERS = {
    "speedup_kernels.png": plot_kernel_speedups,
    "attention_vs_seqlen.png": plot_attention_vs_seqlen,
    "end_to_end.png": plot_end_to_end,
    "memory.png": plot_memory,
}


# ----------------------------------------------------------------------------------------------- the files

def write_report(run: Any, out_dir: "str | os.PathLike") -> Dict[str, Path]:
    """Write ``bench.json``, ``summary.md`` and the plots that have data into ``out_dir`` (created).
    Returns {file name: path} of what was written. Refuses (FileExistsError) to overwrite a report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    taken = [name for name in (JSON_NAME, MARKDOWN_NAME, *PLOTTERS) if (out / name).exists()]
    if taken:
        raise FileExistsError(f"{out} already holds a report ({', '.join(taken)}); choose another folder")
    data = _jsonable(_as_dict(run))
    paths: Dict[str, Path] = {}
    for name, plot in PLOTTERS.items():
        if plot(data, out / name):
            paths[name] = out / name
    data["files"] = [JSON_NAME, MARKDOWN_NAME, *paths]
    (out / JSON_NAME).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    (out / MARKDOWN_NAME).write_text(summary_markdown(data) + "\n")
    return {JSON_NAME: out / JSON_NAME, MARKDOWN_NAME: out / MARKDOWN_NAME, **paths}


def readme_tables(bench_json_path: "str | os.PathLike", relative_to: "Optional[str | os.PathLike]" = None) -> str:
    """The markdown block the README shows between its bench markers: what ran, links to the full report
    and the plots (relative to ``relative_to``, default the current directory), and the headline table."""
    path = Path(bench_json_path)
    data = json.loads(path.read_text())
    env = data.get("environment", {})
    base = Path(relative_to) if relative_to is not None else Path.cwd()

    def link(name: str) -> str:
        return Path(os.path.relpath(path.parent / name, base)).as_posix()

    device = env.get("gpu") or "the CPU"
    commit = (env.get("git_commit") or "unknown")[:12]
    lines = [f"Measured by `fastdit bench` on **{device}** (driver {env.get('driver') or '—'}, CUDA "
             f"{env.get('cuda') or '—'}, cuDNN {env.get('cudnn') or '—'}, torch {env.get('torch')}, triton "
             f"{env.get('triton') or '—'}, fastdit {env.get('fastdit')} @ `{commit}`, {env.get('date', '')}). "
             f"Speed-up = the fastest stock peer's median ms / fastdit's.", ""]
    if _is_cpu(data):
        lines += [CPU_WARNING, ""]
    lines += _table(HEADLINE_HEADER, headline_rows(data)) + [""]
    plots = [f"[{label}]({link(name)})" for name, label in PLOT_NAMES.items() if name in data.get("files", [])]
    lines.append(f"Full report: [{MARKDOWN_NAME}]({link(MARKDOWN_NAME)})"
                 + (" · plots: " + ", ".join(plots) if plots else ""))
    return "\n".join(lines)


def replace_readme_block(readme_text: str, block: str) -> str:
    """``readme_text`` with the text between :data:`README_BEGIN` and :data:`README_END` replaced by
    ``block``; ValueError when the markers are missing or out of order."""
    begin, end = readme_text.find(README_BEGIN), readme_text.find(README_END)
    if begin < 0 or end < 0 or end < begin:
        raise ValueError(f"the README has no {README_BEGIN} ... {README_END} block (both markers, in that "
                         f"order, must be there; this script does not guess where the table goes)")
    head = readme_text[:begin + len(README_BEGIN)]
    return head + "\n" + block.strip("\n") + "\n" + readme_text[end:]
