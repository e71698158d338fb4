"""Plays scenarios against a running server as a real-time microphone and measures each turn.

Timing comes from the audio the client receives, so it works for any server that answers an
offer; the server's events (where it sends ours) add the transcript and the stage breakdown.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
import numpy as np
import soxr

from bench.analysis import (
    Clip,
    Heard,
    OwnStop,
    audio_stop,
    bargein_stop_ms,
    client_v2v_ms,
    first_audible,
    self_interruptions,
    sounded_between,
    speech_end,
    speech_segments,
    underruns,
)
from bench.metrics import word_error_rate
from bench.scenarios import RATE, Scenario, Utterance
from testkit.impair import Direction, Impairment
from testkit.peer import BROWSER_PLAYOUT_FRAMES, ClientPeer, OfferRefused
from testkit.peer import RATE as PEER_RATE
from testkit.room import RoomSpec
from testkit.twilio_peer import TwilioPeer
from testkit.ws_peer import WsPeer

DEFAULT_OFFER_PATH = "/api/offer"
REPLY_TIMEOUT_S = 60.0
QUIET_AFTER_REPLY_S = 1.0
NO_REPLY_WAIT_S = 3.0
TAIL_QUIET_S = 0.2

Transcribe = Callable[[np.ndarray], Awaitable[str]]  # 16 kHz float PCM -> text


@dataclass
class TurnResult:
    scenario: str
    session: int
    turn: int
    text: str
    speech_end_s: float | None
    client_v2v_ms: float | None = None
    bargein_stop_ms: float | None = None
    false_cutoff: bool = False
    false_start: bool = False
    split_turn: bool = False  # the server made more than one user turn of this utterance
    user_wer: float | None = None
    reply_text: str = ""
    reply_wer: float | None = None
    status: str | None = None
    interrupted_reply: bool = False  # a barge-in turn: the reply it spoke over reported `interrupted`
    reply_continued: bool | None = None  # a backchannel or noise spoken over a reply: did it go on?
    server: dict[str, Any] = field(default_factory=dict)  # the server's metrics.turn, if it sends one
    timeline: dict[str, float] = field(default_factory=dict)  # seconds from the session's start


class HeardLog:
    """The received agent audio as levels, each frame measured once as it comes in (the wait
    predicates look at it on every new frame)."""

    def __init__(self, peer: ClientPeer | WsPeer) -> None:
        self._peer = peer
        self._heard: list[Heard] = []

    def __call__(self) -> list[Heard]:
        for frame in self._peer.received[len(self._heard) :]:
            rms = float(np.sqrt(np.mean(frame.pcm.astype(np.float64) ** 2)))
            self._heard.append(Heard(frame.arrival, 20 * np.log10(max(rms, 1e-9))))
        return self._heard


class SessionRun:
    """Owns one call: its peer, and the turns it measured."""

    def __init__(
        self, url: str, index: int, transcribe: Transcribe | None, offer_path: str, events: bool, transport: str,
        playout_frames: int = BROWSER_PLAYOUT_FRAMES,
        impairment: Impairment | None = None,
        room: RoomSpec | None = None,
        twilio_token: str | None = None,
    ) -> None:
        # A speakerphone client has no echo canceller of its own, and says so.
        speaker, cancels = (room.make(seed=index), False) if room is not None else (None, None)
        self.url = url
        self.peer: ClientPeer | WsPeer | TwilioPeer
        if transport == "twilio":
            assert twilio_token is not None, "a phone call is signed with the server's Twilio auth token"
            self.peer = TwilioPeer(url, twilio_token)
        elif transport == "ws":
            self.peer = WsPeer(url, room=speaker, cancels_echo=cancels)
        else:
            self.peer = ClientPeer(
                url, offer_path=offer_path, events=events, playout_frames=playout_frames, impairment=impairment, room=speaker,
                cancels_echo=cancels,
            )
        self.heard = HeardLog(self.peer)
        self.index = index
        self.transcribe = transcribe
        self.results: list[TurnResult] = []
        self.started = 0.0
        self._last_clip_at = 0.0
        self._clips: list[Clip] = []

    async def play(self, scenario: Scenario) -> None:
        await self.peer.connect()
        self.started = time.monotonic()
        await self.peer.changed.wait_for(lambda: self.peer.received, timeout=10)
        turns = scenario.turns
        for number, utterance in enumerate(turns, 1):
            # A reply that the next turn will interrupt is measured only until it starts.
            interrupted = number < len(turns) and turns[number].when == "bargein"
            self.results.append(await self._turn(scenario.name, number, utterance, interrupted))
        if isinstance(self.peer, TwilioPeer):
            await self._heard_from_the_transcript(self.peer.session_id)

    async def _heard_from_the_transcript(self, session_id: str) -> None:
        """A phone carries no events: what the server heard of each turn is read from the call's
        transcript, its user turns in order, when there is one per turn that expected a reply."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/api/sessions/{session_id}/transcript") as response:
            if response.status != 200:
                return
            turns = (await response.json())["turns"]
        heard = [t["text"] for t in turns if t["role"] == "user"]
        asked = [r for r in self.results if r.text and r.client_v2v_ms is not None]
        if len(heard) == len(asked):
            for result, text in zip(asked, heard):
                result.user_wer = round(word_error_rate(result.text, text), 3)

    async def _turn(self, scenario: str, number: int, utterance: Utterance, interrupted: bool) -> TurnResult:
        peer = self.peer
        if utterance.when == "bargein":
            await peer.changed.wait_for(lambda: first_audible(self.heard(), self._last_clip_at) is not None, REPLY_TIMEOUT_S)
            began = first_audible(self.heard(), self._last_clip_at) or time.monotonic()
            delay = began + utterance.bargein_after_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the scenario: speak this far into the reply
        else:
            await self._previous_reply_arrived()
        events_before = len(peer.events)
        clip_at = time.monotonic()
        self._last_clip_at = clip_at
        peer.speak(soxr.resample(utterance.pcm, RATE, PEER_RATE).astype(np.float32), PEER_RATE)
        clip_end_at = clip_at + len(utterance.pcm) / RATE
        end = utterance.speech_end_s if utterance.speech_end_s is not None else speech_end(utterance.pcm, RATE)
        result = TurnResult(scenario, self.index, number, utterance.text, end)
        speech_end_at = clip_at + float(end or 0.0)
        self._clips.append(Clip(clip_at, speech_end_at, clip_end_at))

        if not utterance.expect_reply:
            spoken_over = utterance.when == "bargein"
            if spoken_over:
                result.reply_continued = await self._reply_continued(events_before, clip_end_at)
            await self._until(clip_end_at + NO_REPLY_WAIT_S)
            # Over a reply that goes on, only a new reply is a false start, not the audio.
            replied = not spoken_over and sounded_between(self.heard(), clip_at, time.monotonic())
            created = any(e["type"] == "response.created" for e in peer.events[events_before:])
            result.false_start = replied or created
            return result

        reply_at, done_at = await self._await_reply(speech_end_at, events_before, whole=not interrupted)
        heard = self.heard()
        result.client_v2v_ms = client_v2v_ms(speech_end_at, heard)
        # Cut off: the agent spoke before the words ended (noise going on after them is not the user).
        result.false_cutoff = utterance.when != "bargein" and sounded_between(heard, clip_at, speech_end_at)
        if utterance.when == "bargein":
            onset = clip_at + speech_segments(utterance.pcm, RATE)[0][0]
            result.bargein_stop_ms = bargein_stop_ms(onset, heard)
        new_events = peer.events[events_before:]
        self._read_events(result, new_events)
        if self.transcribe is not None and reply_at is not None and done_at is not None and result.reply_text:
            audio = [f.pcm for f in peer.received if reply_at - 0.1 <= f.arrival <= done_at + 0.5]
            if audio:
                pcm16k = soxr.resample(np.concatenate(audio), PEER_RATE, RATE).astype(np.float32)
                result.reply_wer = round(word_error_rate(result.reply_text, await self.transcribe(pcm16k)), 3)
        result.timeline = {
            "clip_start": round(clip_at - self.started, 3),
            "speech_end": round(speech_end_at - self.started, 3),
            "clip_end": round(clip_end_at - self.started, 3),
            **({"reply_start": round(reply_at - self.started, 3)} if reply_at else {}),
        }
        return result

    async def _reply_continued(self, events_before: int, clip_end_at: float) -> bool:
        """Whether the reply a backchannel was spoken over went on: it ended `completed` (from the
        server's events), or, for a server that sends none, it was still audible a while after."""
        peer = self.peer
        if not peer.expect_events:
            await self._until(clip_end_at + QUIET_AFTER_REPLY_S + 0.5)
            return sounded_between(self.heard(), clip_end_at + 0.5, time.monotonic())
        created = [e for e in peer.events[:events_before] if e["type"] == "response.created"]
        if not created:
            return False
        reply_id = created[-1]["response"]["id"]

        def done() -> dict[str, Any] | None:
            return next((e for e in peer.events if e["type"] == "response.done" and e["response"]["id"] == reply_id), None)

        try:
            event = await peer.changed.wait_for(done, REPLY_TIMEOUT_S)
        except TimeoutError:
            return False
        return bool(event["response"]["status"] == "completed")

    async def _previous_reply_arrived(self) -> None:
        """Wait until the last reply's audio has stopped arriving: the server says a reply is done
        when it has sent it, and its last frames land a transport delay later. Speaking before
        they land would count that tail as the agent talking over the next utterance."""

        def quiet() -> bool:
            last = next((h.arrival for h in reversed(self.heard()) if h.audible), None)
            return last is None or time.monotonic() - last >= TAIL_QUIET_S

        try:
            await self.peer.changed.wait_for(quiet, REPLY_TIMEOUT_S)
        except TimeoutError:
            pass

    async def _await_reply(self, speech_end_at: float, events_before: int, whole: bool) -> tuple[float | None, float | None]:
        """Until the reply has started (`whole=False`) or ended; returns when its first audio
        arrived and when it ended (None where that did not happen within REPLY_TIMEOUT_S)."""
        peer = self.peer

        def ended() -> float | None:
            replies = any(e["type"] == "response.created" for e in peer.events[events_before:])
            if peer.expect_events and replies:  # the server says when a reply is over: metrics.turn follows response.done
                finished = {
                    e["response"]["id"]: e["_received"]
                    for e in peer.events[events_before:]
                    if e["type"] == "response.done" and e["response"]["status"] != "interrupted"
                }
                metrics = (e for e in peer.events[events_before:] if e["type"] == "metrics.turn")
                return next((finished[e["response_id"]] for e in metrics if e["response_id"] in finished), None)
            heard = self.heard()
            start = first_audible(heard, speech_end_at)
            return None if start is None else audio_stop(heard, start, QUIET_AFTER_REPLY_S)

        def reached() -> bool:
            return first_audible(self.heard(), speech_end_at) is not None if not whole else ended() is not None

        try:
            await peer.changed.wait_for(reached, REPLY_TIMEOUT_S)
        except TimeoutError:
            pass
        return first_audible(self.heard(), speech_end_at), ended() if whole else None

    async def _until(self, moment: float) -> None:
        delay = moment - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # a fixed listening window, not waiting for an event

    @staticmethod
    def _read_events(result: TurnResult, events: list[dict[str, Any]]) -> None:
        items = {e["item_id"] for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"}
        result.split_turn = len(items) > 1
        for event in events:
            kind = event["type"]
            if kind == "conversation.item.input_audio_transcription.completed" and result.text:
                result.user_wer = round(word_error_rate(result.text, event["transcript"]), 3)
            elif kind == "response.done":  # the last one is this turn's reply
                result.status = event["response"]["status"]
                result.reply_text = event["response"]["output_text"]
                result.interrupted_reply = result.interrupted_reply or result.status == "interrupted"
            elif kind == "metrics.turn":
                result.server = {k: v for k, v in event.items() if not k.startswith("_") and k != "type"}

    def self_interruptions(self) -> list[OwnStop]:
        return self_interruptions(self.peer.events, self._clips)

    def underruns(self) -> int:
        heard = self.heard()
        return underruns(heard, heard[0].arrival, heard[-1].arrival) if heard else 0

    async def close(self) -> None:
        await self.peer.close()


@dataclass
class CallTotals:
    """What the calls of one run add up to, beyond their turns."""

    offered: int = 0  # calls placed
    refused: int = 0  # of them, refused by a full server (HTTP 503): a server that keeps its capacity
    underruns: int = 0  # holes in the received audio
    self_interruptions: int = 0  # replies paused or stopped by no speech of the user's
    own_stops: list[dict[str, Any]] = field(default_factory=list)  # each such pause or stop: which call, reply, when
    event_stalls: int = 0  # pings whose pong took over a second (WebRTC with events)
    to_server: Direction = field(default_factory=Direction)  # datagrams through an impairment relay
    to_client: Direction = field(default_factory=Direction)

    def add(self, run: SessionRun) -> None:
        self.underruns += run.underruns()
        stops = run.self_interruptions()
        self.self_interruptions += len({stop.response_id for stop in stops})
        self.own_stops += [
            {
                "call": run.index,
                "response_id": stop.response_id,
                "at_s": round(stop.at - run.started, 2),
                "stopped": stop.stopped,
                "reply_began_s": None if stop.began is None else round(stop.began - run.started, 2),
            }
            for stop in stops
        ]
        peer = run.peer
        if isinstance(peer, ClientPeer):
            self.event_stalls += peer.event_stalls()
            if peer.relay is not None:
                for mine, theirs in ((self.to_server, peer.relay.stats.to_server), (self.to_client, peer.relay.stats.to_client)):
                    mine.sent += theirs.sent
                    mine.lost += theirs.lost
                    mine.too_big += theirs.too_big
                    mine.largest = max(mine.largest, theirs.largest)

    def as_dict(self) -> dict[str, Any]:
        network = {"to_server": self.to_server.as_dict(), "to_client": self.to_client.as_dict()}
        calls = {"offered": self.offered, "refused": self.refused}
        return {
            "calls": calls,
            "underruns": self.underruns,
            "self_interruptions": self.self_interruptions,
            "own_stops": self.own_stops,
            "event_stalls": self.event_stalls,
            "network": network,
        }


async def run_sessions(
    url: str, scenarios: list[Scenario], sessions: int, transcribe: Transcribe | None,
    offer_path: str = DEFAULT_OFFER_PATH,
    events: bool = True,
    transport: str = "webrtc",
    playout_frames: int = BROWSER_PLAYOUT_FRAMES,
    impairment: Impairment | None = None,
    room: RoomSpec | None = None,
    twilio_token: str | None = None,
) -> tuple[list[TurnResult], CallTotals]:
    """`sessions` calls at once, each playing every scenario in turn (a fresh call per scenario),
    each through its own relay with `impairment` if given, each on a speakerphone in `room` if
    given. Returns every turn and the totals."""
    results: list[TurnResult] = []
    totals = CallTotals()

    async def one(index: int) -> None:
        for scenario in scenarios:
            run = SessionRun(url, index, transcribe, offer_path, events, transport, playout_frames, impairment, room, twilio_token)
            totals.offered += 1
            try:
                await run.play(scenario)
            except OfferRefused as exc:
                if exc.status != 503:
                    raise
                totals.refused += 1
            finally:
                results.extend(run.results)
                totals.add(run)
                await run.close()

    async with asyncio.TaskGroup() as group:
        for index in range(sessions):
            group.create_task(one(index))
    return results, totals


def as_rows(results: list[TurnResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
