"""The loopback diagnostic profile: the caller hears their own audio after a fixed delay."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import numpy as np
import structlog

from config import LoopbackConfig
from realtime.events import (
    ClientEvent,
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemRetrieve,
    Error,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    ResponseCancel,
    ResponseCreate,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
)
from realtime.session import SessionIO
from runtime.audio import SAMPLE_RATE

log = structlog.get_logger()

MAX_DELAY_MS = 10_000
# Playout reserve put before each burst of echo, so that network jitter in the arriving frames
# does not underrun the paced output and punch gaps into the echo. Each underrun doubles it, up to
# the maximum: a slow or loaded link pays a little more delay instead of a gap every few frames.
JITTER_RESERVE_MS = 60
MAX_JITTER_RESERVE_MS = 240


class LoopbackAgent:
    """Owns the delay line of one session: each input frame is written out `delay_ms` after it came in
    (plus a small playout reserve)."""

    def __init__(self, io: SessionIO, config: LoopbackConfig) -> None:
        self._io = io
        # Its output is the caller's own voice, which a canceller would take out of what comes in
        # next: `auto` never cancels here, whatever the client says (`--echo-cancel on` still does).
        io.echo.declare(client_cancels=True)
        self.delay_ms = config.delay_ms
        self._line: collections.deque[tuple[float, np.ndarray]] = collections.deque()
        self.reserve_ms = JITTER_RESERVE_MS
        self.underruns = 0
        self._playing = False

    def _session_info(self) -> dict[str, Any]:
        return {"id": self._io.session_id, "profile": "loopback", "delay_ms": self.delay_ms}

    async def run(self) -> None:
        self._io.emit(SessionCreated(self._session_info()))
        frames = self._io.frames
        while True:
            timeout = None
            if self._line:
                timeout = max(0.0, self._line[0][0] - time.monotonic())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as
            # a frame arrives, and this loop would then outlive its session.
            try:
                async with asyncio.timeout(timeout):
                    frame = await frames.get()
                self._line.append((time.monotonic() + self.delay_ms / 1000, frame))
            except TimeoutError:
                pass
            now = time.monotonic()
            output = self._io.output
            while self._line and self._line[0][0] <= now:
                if output.queued_ms == 0:
                    self._refill_reserve()
                output.write(self._line.popleft()[1], SAMPLE_RATE)
                self._playing = True

    def _refill_reserve(self) -> None:
        # The caller's microphone streams without pause, so once the echo plays, an empty output
        # means a frame came in later than the reserve allowed for.
        if self._playing:
            self.underruns += 1
            self.reserve_ms = min(2 * self.reserve_ms, MAX_JITTER_RESERVE_MS)
            log.info("loopback.underrun", session_id=self._io.session_id, underruns=self.underruns, reserve_ms=self.reserve_ms)
        self._io.output.write(np.zeros(SAMPLE_RATE * self.reserve_ms // 1000, dtype=np.int16), SAMPLE_RATE)

    def on_client_event(self, event: ClientEvent) -> None:
        if isinstance(event, SessionUpdate):
            self._update(event)
        elif isinstance(event, ResponseCancel):
            self._line.clear()
            self._io.output.flush()
            self._playing = False
        elif isinstance(
            event, (ConversationItemCreate, ConversationItemRetrieve, ConversationItemDelete, ResponseCreate, InputAudioBufferCommit, InputAudioBufferClear)
        ):
            self._io.emit(Error("unsupported", "the loopback profile has no conversation and no turns", event.event_id))
        # playback.position carries nothing the loopback needs.

    def _update(self, event: SessionUpdate) -> None:
        session = event.session
        unknown = set(session) - {"delay_ms"}
        delay = session.get("delay_ms", self.delay_ms)
        if unknown:
            self._io.emit(Error("invalid_value", f"unknown session fields: {sorted(unknown)}", event.event_id))
            return
        if type(delay) is not int or not 0 <= delay <= MAX_DELAY_MS:  # not a bool, not 500.0
            self._io.emit(Error("invalid_value", f"delay_ms must be an integer 0..{MAX_DELAY_MS}", event.event_id))
            return
        self.delay_ms = delay
        self._io.emit(SessionUpdated(self._session_info()))
