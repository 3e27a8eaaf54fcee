"""The machine a benchmark runs on, and the process's memory counters (Linux); no lpt_jax.

`reset_hwm()` right before a call sets the RSS high-water mark (VmHWM, also `ru_maxrss`) to the
current RSS, so `hwm_bytes() - baseline` afterwards is that call's own peak.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path


def cpu_model() -> str:
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.exists() else []
    return next((s.split(":", 1)[1].strip() for s in lines if s.startswith("model name")),
                platform.processor() or "unknown")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def describe() -> dict:
    """cpu, cores, memory_gib, kernel, python, numpy, load (1-min average), date; and, when the
    process has imported jax / torch, their versions and jax's first device."""
    import numpy as np
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = dict(cpu=cpu_model(), cores=cores(), memory_gib=round(mem / 2 ** 30, 1),
               kernel=platform.release(), python=platform.python_version(),
               numpy=np.__version__, load=round(os.getloadavg()[0], 2),
               date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        dev = jax.devices()[0]
        out.update(jax=jax.__version__, device=f"{dev.platform}: {dev.device_kind}",
                   devices=jax.device_count())
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def one_line(info: dict) -> str:
    """The machine in one markdown line."""
    extra = "".join(f", {k} {info[k]}" for k in ("jax", "torch") if k in info)
    dev = f"; device {info['device']}" if "device" in info else ""
    return (f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux "
            f"{info['kernel']}{dev}; Python {info['python']}, numpy {info['numpy']}{extra}; "
            f"1-min load {info['load']} at the start.")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(s.split()[1]) * 1024 for s in f if s.startswith(field + ":"))


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def hwm_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_hwm() -> None:
    """Resets the RSS high-water mark (VmHWM and ru_maxrss) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
