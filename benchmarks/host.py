"""The machine a benchmark runs on, and the process's memory counters (Linux), for the
benchmark scripts (a helper, not a benchmark).

Peak memory of one call: `reset_hwm()` right before it sets the RSS high-water mark (VmHWM,
also what `ru_maxrss` reports) to the current RSS, so `hwm_bytes() - baseline` afterwards is
the call's own peak, not an earlier one from imports or set-up.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def describe() -> dict:
    """cpu, cores, memory_gib, kernel, python, numpy, load (1-min average) and date."""
    import numpy as np
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dict(cpu=cpu_model(), cores=cores(), memory_gib=round(mem / 2 ** 30, 1),
                kernel=platform.release(), python=platform.python_version(),
                numpy=np.__version__, load=os.getloadavg()[0],
                date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_hwm() -> None:
    """Resets the RSS high-water mark (VmHWM and ru_maxrss) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
