"""Which machine and process this is, and whether a process recorded earlier still runs:
what the workdir lease needs to tell a live holder from a dead one."""

from __future__ import annotations

import os
import socket
from typing import Optional


def machine_id() -> str:
    """Hostname plus (on Linux) boot id and pid namespace: equal only where a pid means the
    same process (two containers with one hostname differ in pid namespace)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("")
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("")
    return "|".join(parts)


def process_start(pid: int) -> Optional[str]:
    """Start time (clock ticks since boot) of a running, non-zombie process; None if none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X", "x") else fields[19]


def running(pid: int, start: Optional[str]) -> bool:
    if os.path.isdir("/proc/self"):
        now = process_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
