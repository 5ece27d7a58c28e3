"""The machine and library versions of a CPU benchmark run, for its JSON report (the data-loader benchmarks)."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Dict


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> Dict:
    """Date, machine (CPU model, cores, load average) and library versions."""
    versions = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "Pillow", "urllib3", "pyarrow", "webdataset", "safetensors"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
                        "cpus_usable": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
            "versions": versions}
