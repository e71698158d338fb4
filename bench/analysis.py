"""Reading timings out of audio: where speech is in a clip, and what a client heard when.

Everything here works on plain arrays, (arrival time, level) pairs and the server's events with
their arrival times, so each function can be checked against synthetic signals and timelines
whose answers are known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FRAME_S = 0.02
SILENCE_DBFS = -45.0  # a 20 ms frame below this RMS level counts as silence


def frame_levels(pcm: np.ndarray, rate: int) -> np.ndarray:
    """RMS level in dBFS of each whole 20 ms frame of float PCM."""
    size = int(rate * FRAME_S)
    frames = pcm[: len(pcm) // size * size].astype(np.float64).reshape(-1, size)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-9))


def speech_segments(
    pcm: np.ndarray, rate: int, silence_dbfs: float = SILENCE_DBFS, min_gap_s: float = 0.2
) -> list[tuple[float, float]]:
    """(start_s, end_s) of each stretch of sound; gaps shorter than `min_gap_s` (between words) are
    bridged, so a segment is a phrase."""
    loud = frame_levels(pcm, rate) > silence_dbfs
    segments: list[list[float]] = []
    for index in np.flatnonzero(loud):
        start, end = index * FRAME_S, (index + 1) * FRAME_S
        if segments and start - segments[-1][1] < min_gap_s:
            segments[-1][1] = end
        else:
            segments.append([start, end])
    return [(round(a, 3), round(b, 3)) for a, b in segments]


def speech_end(pcm: np.ndarray, rate: int, silence_dbfs: float = SILENCE_DBFS) -> float | None:
    """Seconds from the clip's start to the end of its last sound, or None for a silent clip."""
    segments = speech_segments(pcm, rate, silence_dbfs)
    return segments[-1][1] if segments else None


@dataclass(frozen=True)
class Heard:
    """One 20 ms frame of agent audio as the client received it."""

    arrival: float  # client clock, seconds
    level_dbfs: float

    @property
    def audible(self) -> bool:
        return self.level_dbfs > SILENCE_DBFS


def first_audible(heard: list[Heard], after: float) -> float | None:
    """Arrival of the first audible frame after `after`."""
    return next((h.arrival for h in heard if h.arrival > after and h.audible), None)


def audio_stop(heard: list[Heard], after: float, quiet_s: float = 0.3) -> float | None:
    """When agent audio that was playing at `after` stopped: the arrival of its last audible frame
    before `quiet_s` of silence. None if nothing was audible after `after`, or it never stopped."""
    last = None
    for frame in heard:
        if frame.arrival <= after:
            continue
        if frame.audible:
            last = frame.arrival
        elif last is not None and frame.arrival - last >= quiet_s:
            return last
    return None


def sounded_between(heard: list[Heard], start: float, end: float) -> bool:
    """Whether any agent audio was audible between two moments: during a noise or silence clip it
    is a false start; before an utterance with an internal pause has ended, a false cut-off."""
    sound = first_audible(heard, start)
    return sound is not None and sound < end


def client_v2v_ms(speech_end_at: float, heard: list[Heard]) -> float | None:
    """End of the user's speech (client clock) to the first audible agent frame after it."""
    reply = first_audible(heard, speech_end_at)
    return None if reply is None else round((reply - speech_end_at) * 1000, 1)


def bargein_stop_ms(onset_at: float, heard: list[Heard]) -> float | None:
    """Onset of the interrupting speech to the last agent audio frame received; 0 when the agent
    was already quiet."""
    stop = audio_stop(heard, onset_at)
    if stop is None:
        return 0.0 if first_audible(heard, onset_at) is None else None
    return round(max(0.0, stop - onset_at) * 1000, 1)


def underruns(heard: list[Heard], start: float, end: float, max_gap_s: float = 0.06) -> int:
    """Holes in the received stream between `start` and `end`: arrivals more than `max_gap_s`
    apart (the client's jitter buffer would have played silence there)."""
    arrivals = [h.arrival for h in heard if start <= h.arrival <= end]
    return sum(1 for a, b in zip(arrivals, arrivals[1:]) if b - a > max_gap_s)


# A reply that pauses or stops this long after the user's clip ended, or with no clip playing, did
# so for no speech of theirs: it heard itself.
SPEECH_EXPLAINS_S = 2.0


@dataclass(frozen=True)
class Clip:
    """One of the user's clips, on the client clock: when it began, its speech ended, it ended."""

    start: float
    speech_end: float
    end: float


@dataclass(frozen=True)
class OwnStop:
    """A reply paused (`stopped` False) or stopped at `at` (client clock) with no speech of the
    user's to explain it; `began`: its first audio, if any came."""

    response_id: str
    at: float
    stopped: bool
    began: float | None


def self_interruptions(events: list[dict[str, Any]], clips: list[Clip]) -> list[OwnStop]:
    """Each time a reply paused or stopped with none of the user's clips to explain it (`events`:
    the server's, each with its `_received` time): the agent took its own voice (a speakerphone's
    echo) for the user's. A clip explains it only if the reply began before the clip's speech was
    over (spoken over it, or cut into a hesitation): a reply to a clip that its own echo stops
    soon after is not the clip's doing."""
    stops: list[OwnStop] = []
    began: dict[str, float] = {}
    for event in events:
        if event["type"] == "response.audio.started":
            began.setdefault(event["response_id"], event["_received"])
            continue
        if event["type"] == "response.audio.paused":
            reply, stopped = event["response_id"], False
        elif event["type"] == "response.done" and event["response"]["status"] == "interrupted":
            reply, stopped = event["response"]["id"], True
        else:
            continue
        at = event["_received"]
        reply_began = began.get(reply, at)
        if not any(c.start <= at <= c.end + SPEECH_EXPLAINS_S and reply_began <= c.speech_end for c in clips):
            stops.append(OwnStop(reply, at, stopped, began.get(reply)))
    return stops
