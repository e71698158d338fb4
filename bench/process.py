"""What a server holds, read from Linux's /proc: CPU time, memory, threads, open files, summed over
the server's process and its children (piper runs in one)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
    readings = _readings(pid)
    return sum(r.cpu_s for r in readings), sum(r.rss_kb for r in readings) / 1024


@dataclass(frozen=True)
class _Reading:
    name: str
    cpu_s: float
    rss_kb: int
    threads: int
    fds: int


def _readings(pid: int) -> list[_Reading]:
    """One reading per process of the tree; a child that ends while it is read is left out (the
    root's own end is an error: the server is gone)."""
    readings = []
    for member in process_tree(pid):
        try:
            readings.append(_read(member, "server" if member == pid else _command_name(member)))
        except (FileNotFoundError, ProcessLookupError):
            if member == pid:
                raise
    return readings


def _command_name(pid: int) -> str:
    """A child's name that outlives its restarts: the module of `python -m X`, else the program."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return Path(argv[0]).name or str(pid)


def _read(pid: int, name: str) -> _Reading:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return _Reading(
        name,
        (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
        int(status.get("VmRSS", "0").split()[0]),  # a zombie has none
        int(status["Threads"]),
        len(os.listdir(f"/proc/{pid}/fd")),
    )


@dataclass(frozen=True)
class Holdings:
    """The resident memory (MB), threads and open file descriptors of a process and its children
    at one moment; the memory also by process ("server", and each child by its command's name)."""

    rss_mb: float
    threads: int
    fds: int
    rss_mb_by_process: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, pid: int) -> Holdings:
        readings = _readings(pid)
        by_process: dict[str, float] = {}
        for r in readings:
            by_process[r.name] = round(by_process.get(r.name, 0.0) + r.rss_kb / 1024, 1)
        return cls(round(sum(r.rss_kb for r in readings) / 1024, 1), sum(r.threads for r in readings), sum(r.fds for r in readings), by_process)
