"""Giving freed memory back to the system (glibc's allocator keeps what a process freed, per
thread arena, and the server's many model and network threads leave it scattered).

Large buffers (audio, model inputs and outputs) come and go with every turn. By default glibc
raises its mmap threshold each time such a buffer is freed, after which buffers of that size live
in the arenas, where what is freed between live neighbours is never returned: the process's
resident size then climbs in steps. `keep_large_buffers_mapped` fixes the threshold, so that
each large buffer is its own mapping, gone when freed; `release_free_memory` trims what the
arenas hold free, after a call has hung up. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LARGE_BUFFER = 128 * 1024  # glibc's initial threshold


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def keep_large_buffers_mapped() -> bool:
    """Fix glibc's mmap threshold (and so its trim threshold) at 128 KiB; True if it took."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, 2 * LARGE_BUFFER))


def release_free_memory() -> bool:
    """Return the free pages of every arena to the system; True if any was."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False
