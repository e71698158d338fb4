"""What Linux's /proc says of a process and those under it (elsewhere: nothing)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it."""
    parents: dict[int, int] = {}
    try:
        entries = [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return [pid]
    for entry in entries:
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # it ended while we looked
            continue
    tree = [pid]
    for member in tree:
        tree += [child for child, parent in parents.items() if parent == member]
    return tree


def cpu_seconds(stat_path: Path) -> float:
    """User and system CPU seconds in a /proc `stat` file (of a process, or of one of its threads)."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used by `pid` and every process under it (one that ends meanwhile is left out)."""
    total = 0.0
    for member in process_tree(pid):
        try:
            total += cpu_seconds(Path(f"/proc/{member}/stat"))
        except (OSError, IndexError, ValueError):
            continue
    return total


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process can keep busy: those it may run on, capped by its control group's CPU
    quota (a container's `--cpus`, a pod's CPU limit), which the affinity does not show."""
    cores = len(os.sched_getaffinity(0))
    quota = _cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, math.ceil(quota - 1e-9)))


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the control group may use per period (cgroup v2's `cpu.max`, else v1's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None without a quota."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
