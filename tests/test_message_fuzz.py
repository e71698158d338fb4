"""The message fuzzer of `python -m bench.abuse` against the loopback profile: every class, both
transports, each message answered, every abusive call still up, a healthy call beside them echoing."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from bench.abuse import CLASSES, abuse
from testkit.peer import ClientPeer
from tests.signals import speechlike

pytestmark = pytest.mark.unit

CASES = 25


def voiced(peer: ClientPeer) -> int:
    return sum(1 for f in peer.received if np.sqrt(np.mean(f.pcm**2)) > 0.01)


async def test_fuzzed_messages_get_errors_and_disturb_nobody(server):
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    healthy = ClientPeer(server.url)
    try:
        healthy_id = await healthy.connect()
        healthy.speak(speechlike(60.0, 48000), 48000)
        session = server.registry.get(healthy_id)
        for transport in ("webrtc", "ws"):
            for name in CLASSES:
                result = await abuse(server.url, transport, name, CASES, seed=7)
                assert result.sent == CASES and result.call_survived, result
                # Each message was answered by one error, or was valid: a mutation that kept an event whole.
                assert result.errors == CASES - result.accepted, result
                if name != "mutated_event":
                    assert result.accepted == 0, result
                else:
                    assert result.errors > CASES // 2, result
        frames_before, voiced_before = session.frames_received, voiced(healthy)
        await healthy.changed.wait_for(lambda: session.frames_received > frames_before + 50, timeout=10)
        await healthy.changed.wait_for(lambda: voiced(healthy) > voiced_before + 25, timeout=10)  # still echoing
        assert not session.closed.is_set()
        assert len(healthy.events) > 0 and not any(e["type"] == "error" for e in healthy.events)
    finally:
        loop.set_exception_handler(previous)
        await healthy.close()
    assert unhandled == [], [c.get("message") for c in unhandled]
