"""What a server holds, read from Linux's /proc: CPU time, memory, threads, open files, summed over
the server's process and its children (piper runs in one)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # it ended while we looked
                continue
    tree = [pid]
    for member in tree:
        tree += [child for child, parent in parents.items() if parent == member]
    return tree


def process_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds used, resident MB) of a Linux process and its children."""
    cpu, rss_kb = 0.0, 0
    for member in process_tree(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss_kb += _status(member, "VmRSS")
    return cpu, rss_kb / 1024


def _status(pid: int, key: str) -> int:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key))


@dataclass(frozen=True)
class Holdings:
    """The resident memory (MB), threads and open file descriptors of a process and its children
    at one moment."""

    rss_mb: float
    threads: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> Holdings:
        tree = process_tree(pid)
        return cls(
            round(sum(_status(member, "VmRSS") for member in tree) / 1024, 1),
            sum(_status(member, "Threads") for member in tree),
            sum(len(os.listdir(f"/proc/{member}/fd")) for member in tree),
        )
