"""What the server does for its memory over days: the C heap's free pages go back to the system."""

from __future__ import annotations

import pytest

from runtime.memory import release_free_memory, resident_mb

pytestmark = pytest.mark.unit


def test_free_pages_among_live_blocks_go_back_to_the_system():
    # 200 MB of 4 KiB blocks (heap, not mmap), one in 64 kept: no free page at the heap's top to
    # trim on its own, every other page free and stranded between the kept ones.
    blocks = [bytearray(4000) for _ in range(50_000)]
    kept = blocks[::64]
    del blocks
    stranded = resident_mb()
    assert release_free_memory()
    assert resident_mb() < stranded - 100, (stranded, resident_mb())
    del kept  # alive until the measurement
