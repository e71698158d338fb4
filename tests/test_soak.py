"""A three-minute soak (`python -m bench.soak` runs it for an hour): every question answered, and
nothing of any call left in the server once they all hung up."""

from __future__ import annotations

import pytest

from bench.soak import soak, write
from testkit.local import local_server

pytestmark = pytest.mark.models


async def test_three_minutes_of_calls_leave_nothing_behind(tmp_path):
    async with local_server("embedded", "--max-load", "off") as (url, pid):
        result = await soak(url, pid, sessions=2, minutes=3, sample_s=5)
    print(write(result, tmp_path / "soak"))
    assert result.unanswered == 0 and result.turns >= 2 * 10 and result.calls >= 10
    before, after = result.before, result.after
    assert before is not None and after is not None
    assert after.sessions == 0
    assert after.tasks <= before.tasks, (before, after)
    # Pools that grow on demand up to a bound (asyncio's executor: 6 threads here) may add a
    # thread or two, and what a library opens once, on first use, a file or two (CI once found
    # one more file, where runs here found none); a thread or a file left by every call would add
    # one per call (10 or more).
    assert after.holdings.fds <= before.holdings.fds + 2, after.holdings.fds_by_kind_beyond(before.holdings)
    assert after.holdings.threads <= before.holdings.threads + 2, (before, after)
    assert (tmp_path / "soak" / "soak.png").exists()
