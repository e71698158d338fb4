"""What a server holds, read from Linux's /proc: CPU time, memory, threads, open files, summed over
the server's process and its children (piper runs in one)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from runtime.procfs import cpu_seconds, process_tree


def process_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds used, resident MB) of a Linux process and its children."""
    readings = _readings(pid)
    return sum(r.cpu_s for r in readings), sum(r.rss_kb for r in readings) / 1024


ENDED_THREADS = "(ended threads)"


def cpu_by_stage(pid: int) -> dict[str, float]:
    """CPU seconds used so far by each part of a server: its threads by name (a model worker names
    its threads after its stage, and the inference libraries' threads it starts inherit the name:
    `asr`, `lm`, `tts`, `turn-end`, `turn-text`; the event loop's and the rest keep the process's
    name), and each child process by its command (piper runs in `models.piper_voice`)."""
    out: dict[str, float] = {}
    for member in process_tree(pid):
        try:
            if member != pid:
                name = _command_name(member)
                out[name] = out.get(name, 0.0) + _read(member, name).cpu_s
                continue
            live = 0.0
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    name, cpu_s = (task / "comm").read_text().strip(), cpu_seconds(task / "stat")
                except (FileNotFoundError, ProcessLookupError):  # the thread ended while we looked
                    continue
                out[name] = out.get(name, 0.0) + cpu_s
                live += cpu_s
            out[ENDED_THREADS] = _read(pid, "server").cpu_s - live  # the process keeps its ended threads' time
        except (FileNotFoundError, ProcessLookupError):  # it ended while we looked
            if member == pid:
                raise
    return out


@dataclass(frozen=True)
class _Reading:
    name: str
    cpu_s: float
    rss_kb: int
    threads: int
    fd_kinds: dict[str, int]


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
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return _Reading(
        name,
        cpu_seconds(Path(f"/proc/{pid}/stat")),
        int(status.get("VmRSS", "0").split()[0]),  # a zombie has none
        int(status["Threads"]),
        _fd_kinds(pid),
    )


def _fd_kinds(pid: int) -> dict[str, int]:
    """A process's open file descriptors counted by kind: `socket`, `pipe`, `anon_inode:[eventfd]`
    and the like, a file by its path (so that what a soak finds left says what it is)."""
    kinds: dict[str, int] = {}
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{fd}")
        except FileNotFoundError:  # closed while we looked
            continue
        kind = target.split(":[", 1)[0] if target.startswith(("socket:", "pipe:")) else target  # not each inode
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@dataclass(frozen=True)
class Holdings:
    """The resident memory (MB), threads and open file descriptors of a process and its children
    at one moment; the memory also by process ("server", and each child by its command's name), the
    descriptors also by kind."""

    rss_mb: float
    threads: int
    fds: int
    rss_mb_by_process: dict[str, float] = field(default_factory=dict)
    fds_by_kind: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, pid: int) -> Holdings:
        readings = _readings(pid)
        by_process: dict[str, float] = {}
        by_kind: dict[str, int] = {}
        for r in readings:
            by_process[r.name] = round(by_process.get(r.name, 0.0) + r.rss_kb / 1024, 1)
            for kind, count in r.fd_kinds.items():
                by_kind[kind] = by_kind.get(kind, 0) + count
        return cls(
            round(sum(r.rss_kb for r in readings) / 1024, 1),
            sum(r.threads for r in readings),
            sum(by_kind.values()),
            by_process,
            dict(sorted(by_kind.items())),
        )

    def fds_by_kind_beyond(self, earlier: Holdings) -> dict[str, int]:
        """How many more (or fewer) descriptors of each kind than `earlier`, the kinds that changed."""
        kinds = set(self.fds_by_kind) | set(earlier.fds_by_kind)
        change = {kind: self.fds_by_kind.get(kind, 0) - earlier.fds_by_kind.get(kind, 0) for kind in sorted(kinds)}
        return {kind: count for kind, count in change.items() if count}
