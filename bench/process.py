"""What a server process holds, read from Linux's /proc: CPU time, memory, threads, open files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def process_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds used, resident MB) of a Linux process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, _status(pid, "VmRSS") / 1024


def _status(pid: int, key: str) -> int:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key))


@dataclass(frozen=True)
class Holdings:
    """A process's resident memory (MB), threads and open file descriptors at one moment."""

    rss_mb: float
    threads: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> Holdings:
        return cls(round(_status(pid, "VmRSS") / 1024, 1), _status(pid, "Threads"), len(os.listdir(f"/proc/{pid}/fd")))
