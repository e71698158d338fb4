"""Call recordings (`--record`): each call as a stereo WAV, the caller on the left (what their
microphone sent), the agent on the right (what the server sent them: what they heard, silence
where a reply was cut off), 16 kHz, beside the call's transcript.

Both sides are placed on the call's own clock, the server's monotonic time since the call began,
on which the agent's frames leave (one a tick). Each frame goes to the next place on its side; the
caller's side, whose frames come at the pace of the client's sound card, gets a frame of silence
put in, or a frame left out, once its drift from the clock, averaged over about a second so that
network jitter does not count, reaches half a frame; either side that stalls (nothing for half a
second) resumes at the clock's place. The two sides stay within a frame of each other however
long the call.
"""

from __future__ import annotations

import re
import time
import wave
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from realtime.audio import InputFramer
from runtime.audio import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE

DRIFT_WEIGHT = 1 / 50  # the drift is averaged over ~50 frames (1 s)
STALL_FRAMES = 25  # a side this far behind the clock (nothing came for half a second) jumps to it
SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.int16)


def recording_path(root: Path, session_id: str) -> Path | None:
    """Where a session's recording is (beside its transcript); None for an id that is not one."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", session_id):
        return None
    return root / "sessions" / f"{session_id}.wav"


class _Side:
    """One channel: its frames waiting for the other side's, where the next one goes, and (the
    caller's side) its drift from the call's clock."""

    def __init__(self, follows_drift: bool) -> None:
        self.waiting: list[np.ndarray] = []
        self.placed = 0  # frames placed so far (written or waiting)
        self.drift = 0.0  # frames ahead of the clock (negative: behind), averaged
        self._follows_drift = follows_drift

    def place(self, frame: np.ndarray, clock_frames: float) -> None:
        # The first frame, or the first after nothing came for a while: silence until now.
        if self.placed < clock_frames - (STALL_FRAMES if self.placed else 1):
            gap = int(clock_frames) - self.placed
            self.waiting.extend([SILENCE] * gap)
            self.placed += gap
            self.drift = 0.0
        if self._follows_drift:
            self.drift += DRIFT_WEIGHT * (self.placed - clock_frames - self.drift)
            if self.drift >= 0.5:  # ahead by half a frame: this one is left out
                self.drift -= 1.0
                return
            if self.drift <= -0.5:  # behind by half a frame: a frame of silence first
                self.drift += 1.0
                self.waiting.append(SILENCE)
                self.placed += 1
        self.waiting.append(frame)
        self.placed += 1


class CallRecording:
    """Owns one call's recording file: the two sides' frames as they come and go, written as
    stereo once both sides have a frame for the same place."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._start = clock()
        # The agent's frames leave on the server's own ticks, which are the call's clock; the
        # caller's come at their sound card's pace, through the network.
        self._caller, self._agent = _Side(follows_drift=True), _Side(follows_drift=False)
        self._agent_framer = InputFramer()  # the output's rate, whatever it is, as 16 kHz frames
        self._file = wave.open(str(path), "wb")
        self._file.setnchannels(2)
        self._file.setsampwidth(2)
        self._file.setframerate(SAMPLE_RATE)

    def _now(self) -> float:
        return (self._clock() - self._start) * 1000 / FRAME_MS

    def heard(self, frame: np.ndarray) -> None:
        """A 20 ms frame of the caller's microphone (16 kHz int16), as it arrived."""
        self._caller.place(frame, self._now())
        self._write()

    def sent(self, frame: np.ndarray, sample_rate: int) -> None:
        """A frame the output sent (int16 at its rate), as it left."""
        now = self._now()
        for part in self._agent_framer.push(frame.astype(np.float32) / 32768, sample_rate):
            self._agent.place(part, now)
        self._write()

    def _write(self) -> None:
        count = min(len(self._caller.waiting), len(self._agent.waiting))
        if count == 0:
            return
        left = np.concatenate(self._caller.waiting[:count])
        right = np.concatenate(self._agent.waiting[:count])
        del self._caller.waiting[:count], self._agent.waiting[:count]
        self._file.writeframesraw(np.column_stack((left, right)).astype("<i2").tobytes())

    def close(self) -> None:
        """The rest of either side, the other padded with silence; the header gets its length."""
        longer = max(len(self._caller.waiting), len(self._agent.waiting))
        for side in (self._caller, self._agent):
            side.waiting.extend([SILENCE] * (longer - len(side.waiting)))
        self._write()
        self._file.close()


class Recorded(Protocol):
    """What a recording needs of a session: its id, and where its transport hands the frames."""

    id: str
    recording: CallRecording | None


class Recordings:
    """Records every call of a server under `root`/sessions/ (a SessionWatcher): a recording starts
    when the call is registered and is closed, its header written, when the call ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: dict[str, CallRecording] = {}

    def opened(self, session: Recorded) -> None:
        path = recording_path(self.root, session.id)
        assert path is not None  # the server makes its own ids
        self._open[session.id] = session.recording = CallRecording(path)

    def event(self, session: Recorded, event: object) -> None:
        pass

    def closed(self, session: Recorded) -> None:
        recording = self._open.pop(session.id, None)
        if recording is not None:
            session.recording = None
            recording.close()
