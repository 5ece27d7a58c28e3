"""One report from several ``fastdit bench`` runs of the same tree on the same GPU (``fastdit bench --merge``).

A full run of every group can take longer than one sitting allows (a job's time limit, a lent GPU): run the
groups in parts (``--group kernels,attention``, then ``--group train``, ...) and merge their ``bench.json``
files. Every peer of one workload always ran in the same process, so each speed-up compares figures measured
side by side; the merged record keeps each part's environment, ceilings, settings and duration under
``parts`` so nothing is hidden. Parts must agree on what makes figures comparable -- GPU, driver, CUDA,
cuDNN, torch, triton, the tree's commit and the context (dtype, quick) -- or the merge is refused, naming the
field that differs. A workload (case and shape) measured in two parts is refused too: no silent choice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

# environment fields that must be equal across parts for their figures to be comparable
MUST_MATCH = ("device", "gpu", "driver", "cuda", "cudnn", "torch", "triton", "git_commit")


def load_run(path: "str | Path") -> Dict[str, Any]:
    """A bench record from ``path``: a ``bench.json``, a ``bench.partial.json`` (what a run cut short had
    finished), or a folder holding either (bench.json first); ValueError naming the file when it is missing or
    not a bench record."""
    path = Path(path)
    if path.is_dir():
        path = path / "bench.json" if (path / "bench.json").is_file() else path / "bench.partial.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such bench.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or not all(key in data for key in ("environment", "rows", "context")):
        raise ValueError(f"{path}: not a fastdit bench record (no environment/rows/context)")
    data["_path"] = str(path)
    return data


def merge_runs(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One bench record (the shape :func:`fastdit.bench.report.write_report` takes) from ``runs`` (records as
    :func:`load_run` returns them), in the given order. Rows keep their order within each part. The first
    part's environment and ceilings head the record; every part's are listed under ``parts``."""
    if len(runs) < 2:
        raise ValueError("--merge needs at least two bench.json files")
    first = runs[0]
    for other in runs[1:]:
        for key in MUST_MATCH:
            a, b = first["environment"].get(key), other["environment"].get(key)
            if a != b:
                raise ValueError(f"cannot merge: '{key}' differs ({first['_path']}: {a!r}; {other['_path']}: "
                                 f"{b!r}); figures from different setups are not comparable")
        for key in sorted(set(first["context"]) | set(other["context"])):
            a, b = first["context"].get(key), other["context"].get(key)
            if a != b:
                raise ValueError(f"cannot merge: context '{key}' differs ({first['_path']}: {a!r}; "
                                 f"{other['_path']}: {b!r})")
    seen: Dict[tuple, str] = {}
    rows: List[Dict[str, Any]] = []
    for run in runs:
        for row in run["rows"]:
            key = (row["name"], row["shape"])
            if key in seen:
                raise ValueError(f"cannot merge: {row['name']}[{row['shape']}] is in both {seen[key]} and "
                                 f"{run['_path']}; keep one (remove its row or rerun the parts)")
            seen[key] = run["_path"]
            rows.append(row)
    parts = [{"path": run["_path"], "environment": run["environment"], "ceilings": run.get("ceilings", {}),
              "settings": run.get("settings", {}), "seconds": run.get("seconds", 0.0),
              "workloads": len(run["rows"])} for run in runs]
    settings = {"merged_from": [run["_path"] for run in runs],
                "cases": [name for run in runs for name in run.get("settings", {}).get("cases", [])],
                "graph": all(run.get("settings", {}).get("graph", False) for run in runs)}
    return {"environment": first["environment"], "ceilings": first.get("ceilings", {}),
            "context": first["context"], "settings": settings, "rows": rows,
            "seconds": sum(float(run.get("seconds", 0.0)) for run in runs), "parts": parts}
