"""Giving freed memory back: with glibc's mmap threshold fixed, large buffers freed between live
small ones leave the process; with its default (a threshold that rises), they stay resident until
the arenas are trimmed."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROGRAM = """
import sys
from runtime.memory import keep_large_buffers_mapped, release_free_memory

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

fixed = sys.argv[1] == "fixed"
if fixed:
    assert keep_large_buffers_mapped()
first = bytearray(1 << 20)
del first  # with glibc's default, freeing a mapped 1 MiB buffer raises its threshold past it
buffers, keepers = [], []
for _ in range(300):  # as a busy server does: large buffers, with small live objects between them
    buffers.append(bytearray(1 << 20))
    keepers.append(bytearray(4096))  # past pymalloc (512 bytes): from the same heap
peak = rss_mb()
buffers.clear()
freed = peak - rss_mb()
release_free_memory()
print(freed, peak - rss_mb())
"""


def _freed(mode: str) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    freed, after_trim = map(float, result.stdout.split())
    return freed, after_trim


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_buffers_leave_the_process_when_freed_and_a_trim_frees_the_rest():
    fixed, _ = _freed("fixed")
    default, trimmed = _freed("default")
    assert fixed > 250, fixed  # each buffer was its own mapping
    assert default < 100, default  # the point: by default they stay in the heap, pinned
    assert trimmed > 250, trimmed  # until the arenas are trimmed
