"""What Linux's /proc says of a process and those under it (elsewhere: nothing)."""

from __future__ import annotations

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
